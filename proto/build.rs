//! Generates the CRI messages (prost) and the RuntimeService/ImageService client and server
//! (tonic) from `cri/api.proto`. Needs `protoc` on PATH (Debian: protobuf-compiler) or in $PROTOC.

fn main() -> std::io::Result<()> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A server that implements only part of the API answers UNIMPLEMENTED for the rest,
        // which is what a kubelet expects from an older runtime.
        .generate_default_stubs(true)
        // AuthConfig carries registry secrets; lib.rs gives it a Debug that redacts them.
        .skip_debug([".runtime.v1.AuthConfig"])
        .compile_protos(&["cri/api.proto"], &["cri"])
}
