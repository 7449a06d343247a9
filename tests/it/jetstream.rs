//! A JetStream round trip on a private nats-server: the stream berth creates takes event
//! subjects, drops a repeated Nats-Msg-Id, and delivers to a durable pull consumer.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;

use crate::fixtures::TestNats;

#[tokio::test]
async fn publish_dedup_and_pull_round_trip() {
    let nats = TestNats::start().await;
    let js = jetstream::new(nats.client().await);
    berth::events::ensure_stream(&js).await.unwrap();
    // A second call (a restart) leaves the stream as it is.
    berth::events::ensure_stream(&js).await.unwrap();

    let payload = berth::events::EventPayload {
        event_id: 7,
        table: "deployment".into(),
        op: "created".into(),
        id: 3,
        app_id: Some(1),
        deployment_id: Some(3),
        node_id: None,
        at: chrono::Utc::now(),
    };
    let body = serde_json::to_vec(&payload).unwrap();
    for _ in 0..2 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "7");
        let ack = js
            .publish_with_headers(payload.subject(), headers, body.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            ack.sequence, 1,
            "the repeat is recognised as the same message"
        );
    }
    let info = js
        .get_stream(berth::events::STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 1);

    let stream = js.get_stream(berth::events::STREAM).await.unwrap();
    let consumer = stream
        .get_or_create_consumer(
            "manager",
            consumer::pull::Config {
                durable_name: Some("manager".into()),
                filter_subject: "deployment.*".into(),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut messages = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let msg = messages.next().await.expect("one message").unwrap();
    assert_eq!(msg.subject.as_str(), "deployment.created");
    let got: berth::events::EventPayload = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(got, payload);
    msg.ack().await.unwrap();

    // Subjects outside the stream's tables are not taken.
    let err = js
        .publish("nonsense.created", "x".into())
        .await
        .unwrap()
        .await;
    assert!(err.is_err(), "a subject of no table has no stream");
}
