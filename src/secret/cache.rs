//! The controller's cache of the Secrets directories control, as [`SecretView`]s.
//!
//! Fed by the Secret watch the way kube's reflector feeds its store (a re-list is buffered and
//! swapped in whole at `InitDone`, so a lookup never sees half a list), but it keeps a view instead
//! of the whole object, under one `namespace/name` key instead of an `ObjectRef` (four strings).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kube::runtime::watcher::Event;

use super::{ObservedSecret, SecretView};

#[derive(Clone, Default)]
pub struct SecretCache {
    inner: Arc<RwLock<Views>>,
}

#[derive(Default)]
struct Views {
    current: HashMap<Box<str>, Arc<SecretView>>,
    /// A re-list in progress, swapped in at its `InitDone`.
    relisting: Option<HashMap<Box<str>, Arc<SecretView>>>,
}

impl SecretCache {
    /// Applies one watch event, before the event goes on to trigger reconciles.
    pub fn apply(&self, event: &Event<ObservedSecret>) {
        let mut views = self.inner.write().expect("poisoned");
        match event {
            Event::Apply(secret) => {
                views.current.insert(key_of(secret), Arc::new(SecretView::from(secret)));
            }
            Event::Delete(secret) => {
                views.current.remove(&key_of(secret));
            }
            Event::Init => views.relisting = Some(HashMap::new()),
            Event::InitApply(secret) => {
                views.relisting.get_or_insert_default().insert(key_of(secret), Arc::new(SecretView::from(secret)));
            }
            Event::InitDone => {
                if let Some(listed) = views.relisting.take() {
                    views.current = listed;
                }
            }
        }
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<SecretView>> {
        self.inner.read().expect("poisoned").current.get(key(namespace, name).as_str()).cloned()
    }

    pub fn len(&self) -> usize {
        self.inner.read().expect("poisoned").current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn key(namespace: &str, name: &str) -> String {
    // Neither a namespace nor a Secret name can contain a slash.
    format!("{namespace}/{name}")
}

fn key_of(secret: &ObservedSecret) -> Box<str> {
    let meta = &secret.metadata;
    key(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default()).into_boxed_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn secret(name: &str, version: &str) -> ObservedSecret {
        ObservedSecret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("tenants".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            ..ObservedSecret::default()
        }
    }

    fn version(cache: &SecretCache, name: &str) -> Option<String> {
        cache.get("tenants", name).and_then(|v| v.resource_version.clone())
    }

    #[test]
    fn events_add_replace_and_remove_views() {
        let cache = SecretCache::default();
        cache.apply(&Event::Apply(secret("a", "1")));
        cache.apply(&Event::Apply(secret("a", "2")));
        cache.apply(&Event::Apply(secret("b", "3")));
        assert_eq!(version(&cache, "a").as_deref(), Some("2"));
        assert_eq!(cache.get("elsewhere", "a"), None, "keyed by namespace too");
        cache.apply(&Event::Delete(secret("a", "2")));
        assert_eq!(version(&cache, "a"), None);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_relist_is_swapped_in_whole_when_done() {
        let cache = SecretCache::default();
        cache.apply(&Event::Apply(secret("gone", "1")));
        cache.apply(&Event::Apply(secret("kept", "1")));
        cache.apply(&Event::Init);
        cache.apply(&Event::InitApply(secret("kept", "5")));
        // Until the list is complete, lookups see the last complete state.
        assert_eq!(version(&cache, "gone").as_deref(), Some("1"));
        assert_eq!(version(&cache, "kept").as_deref(), Some("1"));
        cache.apply(&Event::InitDone);
        assert_eq!(version(&cache, "gone"), None, "deleted while the watch was down");
        assert_eq!(version(&cache, "kept").as_deref(), Some("5"));
        // An empty re-list empties the cache.
        cache.apply(&Event::Init);
        cache.apply(&Event::InitDone);
        assert!(cache.is_empty());
    }
}
