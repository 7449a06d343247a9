//! The Docker engine is real: an image built FROM scratch with busybox-static runs httpd on a
//! host-network port and answers on 127.0.0.1.

use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, StartContainerOptions};

use crate::fixtures::{TestDocker, busybox_httpd_context, eventually, http_get};

#[tokio::test]
async fn scratch_busybox_image_builds_and_serves_on_host_network() {
    let docker = TestDocker::new().await;
    let dir = tempfile::tempdir().unwrap();
    busybox_httpd_context(dir.path(), "hello from scratch\n");
    let tag = docker.build_image(dir.path(), "img").await;

    let port = berth::daemon::embedded::free_port().unwrap();
    let name = docker.name("httpd");
    let config = ContainerCreateBody {
        image: Some(tag.clone()),
        env: Some(vec![format!("PORT={port}")]),
        host_config: Some(HostConfig {
            network_mode: Some("host".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker
        .docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(&name).build()),
            config,
        )
        .await
        .unwrap();
    docker
        .docker
        .start_container(&name, None::<StartContainerOptions>)
        .await
        .unwrap();

    let url = format!("http://127.0.0.1:{port}/");
    eventually(
        "httpd answering on the host port",
        Duration::from_secs(15),
        || {
            let url = url.clone();
            async move {
                http_get(&url)
                    .await
                    .is_some_and(|(s, body)| s == 200 && body.contains("hello from scratch"))
            }
        },
    )
    .await;
}
