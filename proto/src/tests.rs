//! Wire-format tests: field numbers and enum values are compared with the bytes an upstream
//! CRI peer produces, so a wrong number in `cri/api.proto` fails here; plus a real client and
//! server talking over a unix socket in a temp dir.

use std::collections::HashMap;
use std::error::Error as _;

use prost::Message;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status};

use crate::v1::image_service_client::ImageServiceClient;
use crate::v1::runtime_service_client::RuntimeServiceClient;
use crate::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use crate::v1::{self, security_profile::ProfileType};
use crate::{ConnectError, connect_unix};

/// A protobuf key: field number and wire type (0 varint, 1 fixed64, 2 length-delimited).
fn key(field: u32, wire_type: u32) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(u64::from(field << 3 | wire_type), &mut out);
    out
}

/// Bytes of a message holding one length-delimited field.
fn len_field(field: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = key(field, 2);
    prost::encoding::encode_varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// Bytes of a message holding one varint field.
fn varint_field(field: u32, value: u64) -> Vec<u8> {
    let mut out = key(field, 0);
    prost::encoding::encode_varint(value, &mut out);
    out
}

#[test]
fn field_numbers_match_upstream() {
    // (what, encoded by us, expected bytes from upstream's field number and type)
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "VersionResponse.runtime_api_version = 4",
            v1::VersionResponse {
                runtime_api_version: "v1".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(4, b"v1"),
        ),
        (
            "ImageSpec.user_specified_image = 18",
            v1::ImageSpec {
                user_specified_image: "a".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(18, b"a"),
        ),
        (
            "ImageSpec.image_ref = 20",
            v1::ImageSpec {
                image_ref: "d".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(20, b"d"),
        ),
        (
            "LinuxSandboxSecurityContext.run_as_group = 8",
            v1::LinuxSandboxSecurityContext {
                run_as_group: Some(v1::Int64Value { value: 5 }),
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(8, &varint_field(1, 5)),
        ),
        (
            "LinuxSandboxSecurityContext.supplemental_groups_policy = 11",
            v1::LinuxSandboxSecurityContext {
                supplemental_groups_policy: v1::SupplementalGroupsPolicy::Strict.into(),
                ..Default::default()
            }
            .encode_to_vec(),
            varint_field(11, 1),
        ),
        (
            "LinuxContainerSecurityContext.run_as_group = 12",
            v1::LinuxContainerSecurityContext {
                run_as_group: Some(v1::Int64Value { value: 7 }),
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(12, &varint_field(1, 7)),
        ),
        (
            "LinuxContainerSecurityContext.seccomp = 15 (Localhost = 2)",
            v1::LinuxContainerSecurityContext {
                seccomp: Some(v1::SecurityProfile {
                    profile_type: ProfileType::Localhost.into(),
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(15, &varint_field(1, 2)),
        ),
        (
            "LinuxContainerSecurityContext.supplemental_groups_policy = 17",
            v1::LinuxContainerSecurityContext {
                supplemental_groups_policy: v1::SupplementalGroupsPolicy::Strict.into(),
                ..Default::default()
            }
            .encode_to_vec(),
            varint_field(17, 1),
        ),
        (
            "Mount.uidMappings = 6",
            v1::Mount {
                uid_mappings: vec![v1::IdMapping {
                    host_id: 0,
                    container_id: 0,
                    length: 3,
                }],
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(6, &varint_field(3, 3)),
        ),
        (
            "Namespace.options = 2 (NamespaceMode.TARGET = 3 as pid = 2)",
            v1::Namespace {
                options: Some(v1::NamespaceOption {
                    pid: v1::NamespaceMode::Target.into(),
                    ..Default::default()
                }),
            }
            .encode_to_vec(),
            len_field(2, &varint_field(2, 3)),
        ),
        (
            "ContainerConfig.stop_signal = 18 (SIGTERM = 23)",
            v1::ContainerConfig {
                stop_signal: v1::Signal::Sigterm.into(),
                ..Default::default()
            }
            .encode_to_vec(),
            varint_field(18, 23),
        ),
        (
            "ContainerStatus.stop_signal = 19 (SIGKILL = 13)",
            v1::ContainerStatus {
                stop_signal: v1::Signal::Sigkill.into(),
                ..Default::default()
            }
            .encode_to_vec(),
            varint_field(19, 13),
        ),
        (
            "ContainerConfig.CDI_devices = 17",
            v1::ContainerConfig {
                cdi_devices: vec![v1::CdiDevice { name: "g".into() }],
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(17, &len_field(1, b"g")),
        ),
        (
            "ExecRequest.audit_request_id = 7",
            v1::ExecRequest {
                audit_request_id: "r".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(7, b"r"),
        ),
        (
            "PodSandboxStatusResponse.timestamp = 4",
            v1::PodSandboxStatusResponse {
                timestamp: 9,
                ..Default::default()
            }
            .encode_to_vec(),
            varint_field(4, 9),
        ),
        (
            "LinuxContainerResources.memory_swap_limit_in_bytes = 10",
            v1::LinuxContainerResources {
                memory_swap_limit_in_bytes: 1,
                ..Default::default()
            }
            .encode_to_vec(),
            varint_field(10, 1),
        ),
        (
            "RuntimeConfigResponse.linux.cgroup_driver (CGROUPFS = 1)",
            v1::RuntimeConfigResponse {
                linux: Some(v1::LinuxRuntimeConfiguration {
                    cgroup_driver: v1::CgroupDriver::Cgroupfs.into(),
                }),
            }
            .encode_to_vec(),
            len_field(1, &varint_field(1, 1)),
        ),
        (
            "PsiData.Avg10 = 2 (double)",
            v1::PsiData {
                avg10: 1.0,
                ..Default::default()
            }
            .encode_to_vec(),
            [key(2, 1), 1.0_f64.to_le_bytes().to_vec()].concat(),
        ),
        (
            "ImageFsInfoResponse.container_filesystems = 2",
            v1::ImageFsInfoResponse {
                container_filesystems: vec![v1::FilesystemUsage {
                    timestamp: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec(),
            len_field(2, &varint_field(1, 1)),
        ),
    ];
    for (what, ours, upstream) in cases {
        assert_eq!(
            ours, upstream,
            "{what}: our encoding differs from upstream's"
        );
    }
}

#[test]
fn decodes_bytes_an_upstream_peer_sends() {
    // ContainerEventResponse { container_id: "c1", container_event_type: STOPPED (2),
    // created_at: 42 } as a Go CRI runtime would put it on the wire.
    let wire = [len_field(1, b"c1"), varint_field(2, 2), varint_field(3, 42)].concat();
    let event = v1::ContainerEventResponse::decode(wire.as_slice()).unwrap();
    assert_eq!(event.container_id, "c1");
    assert_eq!(
        event.container_event_type(),
        v1::ContainerEventType::ContainerStoppedEvent
    );
    assert_eq!(event.created_at, 42);

    // RuntimeCondition { type: "RuntimeReady", status: true } inside StatusResponse.status.
    let condition = [len_field(1, b"RuntimeReady"), varint_field(2, 1)].concat();
    let wire = len_field(1, &len_field(1, &condition));
    let status = v1::StatusResponse::decode(wire.as_slice()).unwrap();
    let conditions = status.status.unwrap().conditions;
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].r#type, "RuntimeReady");
    assert!(conditions[0].status);
}

#[test]
fn truncated_input_is_a_decode_error() {
    // Claims a 10-byte string but carries 2.
    let mut wire = key(1, 2);
    wire.extend_from_slice(&[10, b'a', b'b']);
    let err = v1::VersionRequest::decode(wire.as_slice()).unwrap_err();
    assert!(err.to_string().contains("buffer underflow"), "{err}");
}

#[test]
fn pod_sandbox_config_round_trips() {
    let config = v1::PodSandboxConfig {
        metadata: Some(v1::PodSandboxMetadata {
            name: "web".into(),
            uid: "0d1f".into(),
            namespace: "default".into(),
            attempt: 2,
        }),
        hostname: "web".into(),
        log_directory: "/var/log/pods/default_web_0d1f".into(),
        dns_config: Some(v1::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: vec![v1::PortMapping {
            protocol: v1::Protocol::Udp.into(),
            container_port: 53,
            host_port: 5353,
            host_ip: "127.0.0.1".into(),
        }],
        labels: HashMap::from([("app".into(), "web".into())]),
        annotations: HashMap::from([("a".into(), "b".into())]),
        linux: Some(v1::LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/pod0d1f".into(),
            security_context: Some(v1::LinuxSandboxSecurityContext {
                namespace_options: Some(v1::NamespaceOption {
                    network: v1::NamespaceMode::Node.into(),
                    ..Default::default()
                }),
                run_as_user: Some(v1::Int64Value { value: 1000 }),
                supplemental_groups: vec![1, 2],
                ..Default::default()
            }),
            sysctls: HashMap::from([("net.ipv4.ip_forward".into(), "1".into())]),
            overhead: None,
            resources: Some(v1::LinuxContainerResources {
                cpu_shares: 512,
                memory_limit_in_bytes: 64 << 20,
                hugepage_limits: vec![v1::HugepageLimit {
                    page_size: "2MB".into(),
                    limit: 0,
                }],
                unified: HashMap::from([("memory.high".into(), "max".into())]),
                ..Default::default()
            }),
        }),
        windows: None,
    };
    let decoded = v1::PodSandboxConfig::decode(config.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, config);
}

#[test]
fn auth_config_debug_hides_secrets() {
    let auth = v1::AuthConfig {
        username: "alice".into(),
        password: "hunter2".into(),
        auth: "YWxpY2U6aHVudGVyMg==".into(),
        server_address: "registry.local".into(),
        identity_token: "idtok".into(),
        registry_token: String::new(),
    };
    let request = v1::PullImageRequest {
        auth: Some(auth),
        ..Default::default()
    };
    let shown = format!("{request:?}");
    for secret in ["hunter2", "YWxpY2U6aHVudGVyMg==", "idtok"] {
        assert!(
            !shown.contains(secret),
            "{secret} leaked into Debug: {shown}"
        );
    }
    assert!(
        shown.contains("alice") && shown.contains("registry.local"),
        "{shown}"
    );
    assert!(shown.contains("<redacted>"), "{shown}");
}

/// A runtime that answers Version and streams two container events; every other RPC
/// falls through to the generated UNIMPLEMENTED stubs.
struct TinyRuntime;

#[tonic::async_trait]
impl RuntimeService for TinyRuntime {
    async fn version(
        &self,
        request: Request<v1::VersionRequest>,
    ) -> Result<Response<v1::VersionResponse>, Status> {
        Ok(Response::new(v1::VersionResponse {
            version: request.into_inner().version,
            runtime_name: "tiny".into(),
            runtime_version: "0.0.1".into(),
            runtime_api_version: crate::API_VERSION.into(),
        }))
    }

    async fn get_container_events(
        &self,
        _request: Request<v1::GetEventsRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<v1::ContainerEventResponse>>, Status> {
        let events = ["a", "b"].map(|id| {
            Ok(v1::ContainerEventResponse {
                container_id: id.into(),
                container_event_type: v1::ContainerEventType::ContainerStartedEvent.into(),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }
}

#[tokio::test]
async fn client_and_server_talk_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cri.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(TinyRuntime))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );

    let channel = connect_unix(&socket).await.unwrap();
    let mut runtime = RuntimeServiceClient::new(channel.clone());

    let version = runtime
        .version(v1::VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.version, "v1");
    assert_eq!(version.runtime_name, "tiny");
    assert_eq!(version.runtime_api_version, "v1");

    let events: Vec<_> = runtime
        .get_container_events(v1::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner()
        .map(|event| event.unwrap().container_id)
        .collect()
        .await;
    assert_eq!(events, ["a", "b"]);

    // Not implemented by TinyRuntime: the default stub answers UNIMPLEMENTED.
    let status = runtime
        .status(v1::StatusRequest { verbose: false })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // No ImageService registered on this server at all.
    let status = ImageServiceClient::new(channel)
        .image_fs_info(v1::ImageFsInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    server.abort();
}

/// The whole `source()` chain of an error, joined, as `anyhow`'s `{:#}` would show it.
fn chain(err: &ConnectError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[tokio::test]
async fn connecting_to_a_missing_socket_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let err = connect_unix(&socket).await.unwrap_err();
    assert!(matches!(err, ConnectError::Connect { .. }), "{err:?}");
    let text = chain(&err);
    assert!(text.contains(&socket.display().to_string()), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
}

#[tokio::test]
async fn connecting_to_a_file_that_is_no_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain-file");
    std::fs::write(&path, b"not a socket").unwrap();
    let text = chain(&connect_unix(&path).await.unwrap_err());
    assert!(text.contains("Connection refused"), "{text}");
}

#[tokio::test]
async fn connecting_to_an_empty_path_is_rejected() {
    let err = connect_unix("").await.unwrap_err();
    assert!(matches!(err, ConnectError::EmptyPath), "{err:?}");
}
