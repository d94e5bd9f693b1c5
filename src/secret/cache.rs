//! The controller's cache of the Secrets directories control, as [`SecretView`]s.
//!
//! Fed by the Secret watch the way kube's reflector feeds its store (a re-list is buffered and
//! swapped in whole at `InitDone`, so a lookup never sees half a list), but it keeps a view instead
//! of the whole object, under one `namespace/name` key instead of an `ObjectRef` (four strings).
//! It also knows the versions the operator wrote itself, so that their echoes on the watch update
//! the cache without triggering another reconcile.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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
    /// Versions written by this operator whose watch events have not arrived yet.
    echoes: HashMap<Box<str>, String>,
}

impl SecretCache {
    /// Applies one watch event. Returns whether it should go on to trigger a reconcile: not when it
    /// is the echo of a version the operator wrote itself (see [`SecretCache::expect_echo`]). A
    /// deletion of a Secret that no longer names its directory (an ownerReference stripped: the watch
    /// evicts it as a delete) gets the reference it was cached under back, so that the directory is
    /// triggered and fails closed rather than keep vouching for a token it no longer controls.
    pub fn apply(&self, event: &mut Event<ObservedSecret>) -> bool {
        let mut views = self.inner.write().expect("poisoned");
        match event {
            Event::Apply(secret) => {
                let key = key_of(secret);
                let own = secret.metadata.resource_version.as_ref().is_some_and(|v| views.echoes.get(&key) == Some(v));
                if own {
                    views.echoes.remove(&key);
                }
                views.current.insert(key, Arc::new(SecretView::from(&*secret)));
                return !own;
            }
            Event::Delete(secret) => {
                let key = key_of(secret);
                let cut_loose = !super::is_directory_controlled(&secret.metadata);
                if let Some(owner) = views.current.get(&key).and_then(|v| v.directory_owner()).filter(|_| cut_loose) {
                    secret.metadata.owner_references = Some(vec![owner]);
                }
                views.current.remove(&key);
                views.echoes.remove(&key);
            }
            Event::Init => {
                // A re-list delivers the latest state only: an awaited version may never show up.
                views.echoes.clear();
                views.relisting = Some(HashMap::new());
            }
            Event::InitApply(secret) => {
                views.relisting.get_or_insert_default().insert(key_of(secret), Arc::new(SecretView::from(&*secret)));
            }
            Event::InitDone => {
                if let Some(listed) = views.relisting.take() {
                    views.current = listed;
                }
            }
        }
        true
    }

    /// Notes a Secret version the operator has just written. Its watch event then updates the cache
    /// but triggers no reconcile: the reconcile that wrote it decided on everything it holds, and one
    /// more would only hold a concurrency slot to find nothing to do (at 10,000 new directories,
    /// one redundant reconcile per directory). An echo that came before the write's response did
    /// trigger one, as before; it is not awaited.
    pub fn expect_echo(&self, written: &ObjectMeta) {
        let Some(version) = written.resource_version.clone() else { return };
        let key = key(written.namespace.as_deref().unwrap_or_default(), written.name.as_deref().unwrap_or_default());
        let mut views = self.inner.write().expect("poisoned");
        let seen = views.current.get(key.as_str()).is_some_and(|v| v.resource_version.as_ref() == Some(&version));
        if !seen {
            views.echoes.insert(key.into_boxed_str(), version);
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
        cache.apply(&mut Event::Apply(secret("a", "1")));
        cache.apply(&mut Event::Apply(secret("a", "2")));
        cache.apply(&mut Event::Apply(secret("b", "3")));
        assert_eq!(version(&cache, "a").as_deref(), Some("2"));
        assert_eq!(cache.get("elsewhere", "a"), None, "keyed by namespace too");
        cache.apply(&mut Event::Delete(secret("a", "2")));
        assert_eq!(version(&cache, "a"), None);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn echoes_of_own_writes_update_the_cache_but_trigger_nothing() {
        let cache = SecretCache::default();
        cache.expect_echo(&secret("a", "7").metadata);
        assert!(cache.apply(&mut Event::Apply(secret("a", "6"))), "an older version, someone else's");
        assert!(!cache.apply(&mut Event::Apply(secret("a", "7"))), "our own write");
        assert_eq!(version(&cache, "a").as_deref(), Some("7"));
        assert!(cache.apply(&mut Event::Apply(secret("a", "7"))), "awaited once only");
        assert!(cache.apply(&mut Event::Apply(secret("a", "8"))), "a later change by someone else");

        // An echo that arrived before the write's response is not awaited.
        cache.expect_echo(&secret("a", "8").metadata);
        assert!(cache.apply(&mut Event::Apply(secret("a", "9"))));
        // Neither is one a delete or a re-list has made moot.
        cache.expect_echo(&secret("a", "10").metadata);
        cache.apply(&mut Event::Delete(secret("a", "9")));
        assert!(cache.apply(&mut Event::Apply(secret("a", "10"))));
        cache.expect_echo(&secret("b", "11").metadata);
        cache.apply(&mut Event::Init);
        cache.apply(&mut Event::InitDone);
        assert!(cache.apply(&mut Event::Apply(secret("b", "11"))));
        // Relisted objects always go on (a restarted watch may have missed changes).
        assert!(cache.apply(&mut Event::InitApply(secret("b", "11"))));
    }

    #[test]
    fn a_relist_is_swapped_in_whole_when_done() {
        let cache = SecretCache::default();
        cache.apply(&mut Event::Apply(secret("gone", "1")));
        cache.apply(&mut Event::Apply(secret("kept", "1")));
        cache.apply(&mut Event::Init);
        cache.apply(&mut Event::InitApply(secret("kept", "5")));
        // Until the list is complete, lookups see the last complete state.
        assert_eq!(version(&cache, "gone").as_deref(), Some("1"));
        assert_eq!(version(&cache, "kept").as_deref(), Some("1"));
        cache.apply(&mut Event::InitDone);
        assert_eq!(version(&cache, "gone"), None, "deleted while the watch was down");
        assert_eq!(version(&cache, "kept").as_deref(), Some("5"));
        // An empty re-list empties the cache.
        cache.apply(&mut Event::Init);
        cache.apply(&mut Event::InitDone);
        assert!(cache.is_empty());
    }

    #[test]
    fn a_secret_cut_loose_from_its_directory_still_names_it_when_evicted() {
        use crate::api::{ScimDirectory, ScimDirectorySpec};
        use kube::Resource;
        let mut dir = ScimDirectory::new("acme", ScimDirectorySpec::default());
        dir.metadata.uid = Some("uid-1".into());
        let mut owned = secret("acme-scim-token", "1");
        owned.metadata.owner_references = Some(vec![dir.controller_owner_ref(&()).unwrap()]);
        let cache = SecretCache::default();
        cache.apply(&mut Event::Apply(owned.clone()));

        // The watch turns the stripped Secret into a delete (see the controller's stream): it gets
        // the reference it was cached under, so the directory is triggered.
        let mut evicted = Event::Delete(secret("acme-scim-token", "2"));
        assert!(cache.apply(&mut evicted));
        let Event::Delete(evicted) = evicted else { unreachable!() };
        assert_eq!(evicted.metadata.owner_references, owned.metadata.owner_references);
        assert_eq!(version(&cache, "acme-scim-token"), None);
        // A Secret never cached as a directory's gets nothing.
        let mut unknown = Event::Delete(secret("other", "3"));
        cache.apply(&mut unknown);
        let Event::Delete(unknown) = unknown else { unreachable!() };
        assert_eq!(unknown.metadata.owner_references, None);
    }
}
