//! The generated CRI client (`ferrolet-cri`) against a real containerd 1.6, started privately
//! per test: proves our `runtime.v1` proto interoperates on the wire with an upstream peer.
//! Needs root and the Debian `containerd` package; without them the test fails, it never passes
//! vacuously.

use ferrolet_cri::v1::image_service_client::ImageServiceClient;
use ferrolet_cri::v1::runtime_service_client::RuntimeServiceClient;
use ferrolet_cri::{API_VERSION, connect_unix, v1};
use ferrolet_tests::containerd::Containerd;
use tonic::Code;
use tonic::transport::Channel;

/// Starts a private containerd (outside any async runtime, the harness blocks) and runs `body`
/// with a channel to its CRI socket. containerd is stopped and removed when this returns.
fn with_containerd(body: impl AsyncFnOnce(&Containerd, Channel)) {
    let containerd = Containerd::start().expect("start a private containerd (needs root)");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let channel = connect_unix(&containerd.socket)
            .await
            .expect("connect to containerd's CRI socket");
        body(&containerd, channel).await;
    });
}

#[test]
fn containerd_answers_version_status_sandbox_list_and_image_fs_info() {
    with_containerd(async |containerd, channel| {
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        let mut images = ImageServiceClient::new(channel);

        let version = runtime
            .version(v1::VersionRequest {
                version: API_VERSION.into(),
            })
            .await
            .expect("Version")
            .into_inner();
        assert_eq!(version.runtime_name, "containerd", "{version:?}");
        assert_eq!(version.runtime_api_version, "v1", "{version:?}");
        assert!(
            version.runtime_version.starts_with("1.6"),
            "the Debian package is containerd 1.6: {version:?}"
        );

        let status = runtime
            .status(v1::StatusRequest { verbose: false })
            .await
            .expect("Status")
            .into_inner();
        let conditions = status.status.expect("StatusResponse.status").conditions;
        let condition = |kind: &str| {
            conditions
                .iter()
                .find(|c| c.r#type == kind)
                .unwrap_or_else(|| panic!("no {kind} condition in {conditions:?}"))
        };
        assert!(condition("RuntimeReady").status, "{conditions:?}");
        // The harness gives containerd an empty CNI config dir, so its network is not ready;
        // the condition is still reported, with the kubelet's well-known reason.
        let network = condition("NetworkReady");
        assert!(!network.status, "{conditions:?}");
        assert_eq!(network.reason, "NetworkPluginNotReady", "{network:?}");

        let sandboxes = runtime
            .list_pod_sandbox(v1::ListPodSandboxRequest { filter: None })
            .await
            .expect("ListPodSandbox")
            .into_inner();
        assert!(
            sandboxes.items.is_empty(),
            "fresh containerd: {sandboxes:?}"
        );

        let fs_info = images
            .image_fs_info(v1::ImageFsInfoRequest {})
            .await
            .expect("ImageFsInfo")
            .into_inner();
        assert!(!fs_info.image_filesystems.is_empty(), "{fs_info:?}");
        for usage in &fs_info.image_filesystems {
            let mountpoint = &usage.fs_id.as_ref().expect("fs_id").mountpoint;
            assert!(
                std::path::Path::new(mountpoint).starts_with(&containerd.root),
                "image fs {mountpoint} is not under the private root {}",
                containerd.root.display()
            );
            assert!(usage.timestamp > 0, "{usage:?}");
            assert!(usage.used_bytes.is_some(), "{usage:?}");
        }

        // An image that is not there is not an error: the response just has no image.
        let absent = images
            .image_status(v1::ImageStatusRequest {
                image: Some(v1::ImageSpec {
                    image: "example.invalid/ferrolet/absent:1".into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .expect("ImageStatus")
            .into_inner();
        assert!(absent.image.is_none(), "{absent:?}");
    });
}

#[test]
fn container_status_of_an_unknown_id_is_not_found() {
    with_containerd(async |_containerd, channel| {
        let mut runtime = RuntimeServiceClient::new(channel);
        let id = "ferrolet-no-such-container";
        let err = runtime
            .container_status(v1::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .expect_err("ContainerStatus of an unknown id must fail");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        // containerd 1.6 says: an error occurred when try to find container "<id>": not found
        assert!(
            err.message().contains(&format!("container \"{id}\""))
                && err.message().ends_with("not found"),
            "message names the id and says not found: {err:?}"
        );
    });
}
