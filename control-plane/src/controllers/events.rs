//! Recording core/v1 Events about objects, as `kubectl describe` shows them. Failing to record
//! an event is logged, never an error of the caller: events are advisory.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};

use super::client::{ClusterClient, Object, Scope, Typed};

#[derive(Clone)]
pub struct EventRecorder {
    client: Arc<dyn ClusterClient>,
    component: String,
}

/// A reference to an object for `involvedObject`.
pub fn object_reference<K: Object>(obj: &K) -> ObjectReference
where
    K::Scope: Scope,
{
    let m = obj.metadata();
    ObjectReference {
        api_version: Some(K::API_VERSION.to_owned()),
        kind: Some(K::KIND.to_owned()),
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        ..ObjectReference::default()
    }
}

impl EventRecorder {
    pub fn new(client: Arc<dyn ClusterClient>, component: impl Into<String>) -> Self {
        EventRecorder {
            client,
            component: component.into(),
        }
    }

    pub async fn normal<K: Object>(&self, obj: &K, reason: &str, message: &str)
    where
        K::Scope: Scope,
    {
        self.record(obj, "Normal", reason, message).await;
    }

    pub async fn warning<K: Object>(&self, obj: &K, reason: &str, message: &str)
    where
        K::Scope: Scope,
    {
        self.record(obj, "Warning", reason, message).await;
    }

    async fn record<K: Object>(&self, obj: &K, type_: &str, reason: &str, message: &str)
    where
        K::Scope: Scope,
    {
        let now = super::pods::now();
        let m = obj.metadata();
        let namespace = m
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", m.name.as_deref().unwrap_or("object"))),
                namespace: Some(namespace),
                ..ObjectMeta::default()
            },
            involved_object: object_reference(obj),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            type_: Some(type_.to_owned()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.component.clone()),
            action: Some(reason.to_owned()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some(self.component.clone()),
                host: None,
            }),
            ..Event::default()
        };
        if let Err(e) = Typed::<Event>::new(self.client.as_ref())
            .create(&event)
            .await
        {
            tracing::debug!(reason, error = %e, "recording event failed");
        }
    }
}
