//! The chart's secret-write policy on its own, with cluster-wide RBAC (create on every Secret of the
//! cluster) and then watching one namespace: each refusal a named case with the policy's message.

use super::*;

/// The secret-write policy admits exactly the operator's two kinds of Secret writes, as the operator
/// makes them, and nothing that only resembles them: with cluster-wide RBAC (create on every Secret of
/// the cluster), the ServiceAccount may not plant a service-account-token Secret in kube-system (the
/// token controller would fill in a non-expiring token of any ServiceAccount it names, which the
/// operator's account could read back), nor any other type, ServiceAccount annotation or data key; it
/// creates its record key once, in the release namespace, and never changes it. Then, watching one
/// namespace, the record key's own Role is what lets it read and create that Secret.
#[tokio::test]
async fn secret_write_policy_admits_only_the_operators_own_secrets() {
    let p = UnderPolicy::install().await;
    p.refuses_a_planted_service_account_token().await;
    let exact = p.the_operators_token_secret().await;
    p.refuses_token_secrets_that_only_resemble_it(&exact).await;
    p.admits_it_and_only_updates_that_keep_its_shape(&exact).await;
    p.refuses_record_keys_that_only_resemble_the_operators().await;
    p.admits_the_record_key_once_and_never_an_update().await;
    p.creates_the_record_key_through_its_role_when_watching_one_namespace().await;
    let (ok, _, err) = helm(p.cp, &["uninstall", RELEASE, "-n", &p.release_ns]);
    assert!(ok, "{err}");
}

const RELEASE: &str = "keys";
const FULLNAME: &str = "keys-scim-token-operator";

/// What the steps share: the chart installed cluster-wide, and the operator's ServiceAccount's
/// clients for Secrets in the team's namespace, the release namespace and kube-system.
struct UnderPolicy {
    cp: &'static ControlPlane,
    admin: kube::Client,
    release_ns: String,
    team_ns: String,
    /// The record key's name, as the operator reads it from its Deployment.
    record_key: String,
    as_operator: kube::Client,
    team_secrets: Api<Secret>,
    release_secrets: Api<Secret>,
    kube_system: Api<Secret>,
}

fn dry_run() -> PostParams {
    PostParams { dry_run: true, ..PostParams::default() }
}

fn managed() -> Value {
    json!({ "app.kubernetes.io/managed-by": "scim-token-operator" })
}

/// A Secret the operator writes (`base`), changed in one respect, and the message that refuses it.
struct Resembling {
    what: &'static str,
    change: fn(&mut Value),
    refused_with: &'static str,
}

/// An update of a Secret, refused with `refused_with`, or by the API server before admission (`None`).
struct Update {
    what: &'static str,
    patch: Value,
    refused_with: Option<&'static str>,
}

impl UnderPolicy {
    async fn install() -> UnderPolicy {
        let cp = ControlPlane::shared();
        let admin = cp.client().await;
        let release_ns = cp.create_namespace("policy-op").await.unwrap();
        let team_ns = cp.create_namespace("policy-team").await.unwrap();
        let (ok, out, err) =
            helm(cp, &["install", RELEASE, CHART, "-n", &release_ns, "--set", "verifier.enabled=false"]);
        assert!(ok, "helm install: {err}{out}");
        let (ok, manifest, err) = helm(cp, &["get", "manifest", RELEASE, "-n", &release_ns]);
        assert!(ok, "{err}");
        let env = container_env(find_of(&parse_docs(&manifest), "Deployment", "operator"), "pod", &release_ns);
        let record_key = env.iter().find(|(k, _)| k == "RECORD_KEY_SECRET").map(|(_, v)| v.clone());
        assert_eq!(record_key.as_deref(), Some(format!("{FULLNAME}-record-key").as_str()), "{env:?}");

        let user = format!("system:serviceaccount:{release_ns}:{FULLNAME}");
        let sa_group = format!("system:serviceaccounts:{release_ns}");
        let groups = ["system:serviceaccounts", sa_group.as_str(), "system:authenticated"];
        let as_operator = cp.impersonating_client(&user, &groups).await;
        let secrets_in = |ns: &str| Api::<Secret>::namespaced(as_operator.clone(), ns);
        let (team_secrets, release_secrets, kube_system) =
            (secrets_in(&team_ns), secrets_in(&release_ns), secrets_in("kube-system"));
        wait_until_policy_enforced(&team_secrets).await;
        UnderPolicy {
            cp,
            admin,
            release_ns,
            team_ns,
            record_key: record_key.unwrap(),
            as_operator,
            team_secrets,
            release_secrets,
            kube_system,
        }
    }

    /// The escalation: a service-account-token Secret for a powerful ServiceAccount, labelled and
    /// "controlled" by a ScimDirectory that does not exist, of an old and of the current API version.
    async fn refuses_a_planted_service_account_token(&self) {
        for api_version in ["scim.tokenops.dev/v0", "scim.tokenops.dev/v1alpha1"] {
            let fake_owner = json!({
                "apiVersion": api_version,
                "kind": "ScimDirectory",
                "name": "x",
                "uid": "0b5c3f0e-6a52-4d36-9a3e-2f1d8c7b9e41",
                "controller": true
            });
            let planted = secret_of(json!({
                "metadata": {
                    "name": "scim-escalation",
                    "labels": managed(),
                    "annotations": { "kubernetes.io/service-account.name": "clusterrole-aggregation-controller" },
                    "ownerReferences": [fake_owner]
                },
                "type": "kubernetes.io/service-account-token"
            }));
            refused(
                self.kube_system.create(&dry_run(), &planted).await,
                Some(NOT_OPAQUE),
                &format!("a service-account-token Secret in kube-system, owner {api_version}"),
            );
        }
    }

    /// A directory of the team (nobody reconciles it here) and the Secret the operator writes for it,
    /// from the operator's own code (src/secret/mod.rs), with a secretTemplate's label and annotation.
    async fn the_operators_token_secret(&self) -> Secret {
        let mut dir: ScimDirectory = serde_yaml::from_str(BASIC).unwrap();
        dir.spec.secret_template = Some(scim_token_operator::api::SecretTemplate {
            labels: [("tenant".to_string(), "initech".to_string())].into(),
            annotations: [("example.com/owner".to_string(), "identity".to_string())].into(),
        });
        let dirs = Api::<ScimDirectory>::namespaced(self.admin.clone(), &self.team_ns);
        let dir = dirs.create(&PostParams::default(), &dir).await.unwrap();
        let token = Token::generate();
        let record = scim_token_operator::policy::IssueRecord {
            token_hash: token.hash(),
            rotation_generation: 0,
            expires_in: None,
            rotation_request: None,
            issued_at: k8s_openapi::jiff::Timestamp::now(),
            expires_at: None,
            reason: scim_token_operator::policy::IssueReason::Initial,
            previous: None,
            end_overlap_request: None,
            idp: None,
        };
        let key = scim_token_operator::secret::RecordKey::generate();
        // An old API version of the directory is not the operator's controller reference.
        let mut old_version = serde_json::to_value(dir.controller_owner_ref(&()).unwrap()).unwrap();
        old_version["apiVersion"] = json!("scim.tokenops.dev/v0");
        refused(
            self.team_secrets.create(&dry_run(), &test_secret("planted", managed(), Some(&old_version))).await,
            Some(NOT_OWNED),
            "a token Secret controlled by scim.tokenops.dev/v0",
        );
        scim_token_operator::secret::desired_secret(&dir, &token, &record, &key)
    }

    /// What the operator writes, changed in one respect each (stringData is folded into data before
    /// admission: the extra key through stringData is refused too).
    async fn refuses_token_secrets_that_only_resemble_it(&self, exact: &Secret) {
        let cases = [
            Resembling {
                what: "a service-account-token Secret of the directory",
                change: |s| {
                    s["type"] = json!("kubernetes.io/service-account-token");
                    s["metadata"]["annotations"]["kubernetes.io/service-account.name"] = json!("default");
                    s["data"] = json!(null);
                },
                refused_with: NOT_OPAQUE,
            },
            Resembling {
                what: "a basic-auth Secret",
                change: |s| {
                    s["type"] = json!("kubernetes.io/basic-auth");
                    s["data"]["password"] = json!("aHVudGVyMg==");
                },
                refused_with: NOT_OPAQUE,
            },
            Resembling {
                what: "an Opaque Secret with a service-account.name annotation",
                change: |s| s["metadata"]["annotations"]["kubernetes.io/service-account.name"] = json!("default"),
                refused_with: SA_ANNOTATION,
            },
            Resembling {
                what: "an Opaque Secret with a service-account.uid annotation",
                change: |s| s["metadata"]["annotations"]["kubernetes.io/service-account.uid"] = json!("0b5c3f0e"),
                refused_with: SA_ANNOTATION,
            },
            Resembling {
                what: "an extra data key",
                change: |s| s["data"]["ca.crt"] = json!("Y2E="),
                refused_with: NOT_ONLY_TOKEN,
            },
            Resembling {
                what: "an extra stringData key",
                change: |s| s["stringData"] = json!({ "ca.crt": "ca" }),
                refused_with: NOT_ONLY_TOKEN,
            },
            Resembling {
                what: "a Secret without token",
                change: |s| s["data"] = json!({ "other": "eA==" }),
                refused_with: NOT_ONLY_TOKEN,
            },
        ];
        let exact = serde_json::to_value(exact).unwrap();
        for Resembling { what, change, refused_with } in cases {
            let mut secret = exact.clone();
            change(&mut secret);
            refused(self.team_secrets.create(&dry_run(), &secret_of(secret)).await, Some(refused_with), what);
        }
    }

    /// The exact Secret is admitted; of the updates, only one that keeps it what it is.
    async fn admits_it_and_only_updates_that_keep_its_shape(&self, exact: &Secret) {
        // Another test's operator watching every namespace may have issued the directory's Secret
        // first: a 409 comes from storage, after admission.
        match self.team_secrets.create(&PostParams::default(), exact).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(other) => panic!("the operator's own token Secret must be admitted, got {other:?}"),
        }
        let name = exact.metadata.name.clone().unwrap();
        let before = self.team_secrets.get(&name).await.unwrap().metadata.resource_version;
        // The type is immutable: the API server's validation refuses that before admission.
        let cases = [
            Update {
                what: "changing the type",
                patch: json!({ "type": "kubernetes.io/service-account-token" }),
                refused_with: None,
            },
            Update {
                what: "adding a data key",
                patch: json!({ "data": { "ca.crt": "Y2E=" } }),
                refused_with: Some(NOT_ONLY_TOKEN),
            },
            Update {
                what: "adding a stringData key",
                patch: json!({ "stringData": { "extra": "x" } }),
                refused_with: Some(NOT_ONLY_TOKEN),
            },
            Update {
                what: "removing the token",
                patch: json!({ "data": { "token": null } }),
                refused_with: Some(NOT_ONLY_TOKEN),
            },
            Update {
                what: "adding a service-account.name annotation",
                patch: json!({ "metadata": { "annotations": { "kubernetes.io/service-account.name": "default" } } }),
                refused_with: Some(SA_ANNOTATION),
            },
        ];
        for Update { what, patch, refused_with } in cases {
            let result = self.team_secrets.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await;
            refused(result, refused_with, what);
        }
        self.team_secrets
            .patch(
                &name,
                &PatchParams { dry_run: true, ..PatchParams::default() },
                &Patch::Merge(json!({ "metadata": { "annotations": { "example.com/checked": "yes" } } })),
            )
            .await
            .expect("an update that keeps the Secret's shape is admitted (dry run)");
        assert_eq!(self.team_secrets.get(&name).await.unwrap().metadata.resource_version, before, "nothing changed");
    }

    /// The record key: only its exact create, in the release namespace, under its name.
    async fn refuses_record_keys_that_only_resemble_the_operators(&self) {
        let cases = [
            Resembling {
                what: "a record key under another name",
                change: |s| s["metadata"]["name"] = json!(format!("{}-2", s["metadata"]["name"].as_str().unwrap())),
                refused_with: NOT_ONLY_TOKEN,
            },
            Resembling {
                what: "a record key with an extra key",
                change: |s| s["data"]["extra"] = json!("eA=="),
                refused_with: NOT_ONLY_KEY,
            },
            Resembling {
                what: "a token Secret under the record key's name",
                change: |s| s["data"] = json!({ "token": "eA==" }),
                refused_with: NOT_ONLY_KEY,
            },
            Resembling {
                what: "a record key with an ownerReference",
                change: |s| {
                    s["metadata"]["ownerReferences"] = json!([{
                        "apiVersion": "v1", "kind": "ConfigMap", "name": "x",
                        "uid": "0b5c3f0e-6a52-4d36-9a3e-2f1d8c7b9e41"
                    }])
                },
                refused_with: RECORD_KEY_OWNED,
            },
            Resembling {
                what: "a record key with a service-account.name annotation",
                change: |s| s["metadata"]["annotations"] = json!({ "kubernetes.io/service-account.name": "default" }),
                refused_with: SA_ANNOTATION,
            },
            Resembling {
                what: "a record key of another type",
                change: |s| s["type"] = json!("scim.tokenops.dev/record-key"),
                refused_with: NOT_OPAQUE,
            },
        ];
        for Resembling { what, change, refused_with } in cases {
            let mut secret = record_key_secret(&self.record_key);
            change(&mut secret);
            refused(self.release_secrets.create(&dry_run(), &secret_of(secret)).await, Some(refused_with), what);
        }
        refused(
            self.team_secrets.create(&dry_run(), &secret_of(record_key_secret(&self.record_key))).await,
            Some(NOT_ONLY_TOKEN),
            "a record key in another namespace",
        );
    }

    /// The exact record key is created once; every update of it is refused.
    async fn admits_the_record_key_once_and_never_an_update(&self) {
        let (secrets, record_key) = (&self.release_secrets, &self.record_key);
        secrets
            .create(&PostParams::default(), &secret_of(record_key_secret(record_key)))
            .await
            .expect("the operator's record key is admitted");
        // A second replica's create: admitted, then 409 from storage (it then reads the winner's key).
        match secrets.create(&PostParams::default(), &secret_of(record_key_secret(record_key))).await {
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            other => panic!("a second create of the record key gets 409, got {:?}", other.map(|_| "admitted")),
        }
        let stored = secrets.get(record_key).await.expect("the operator reads its record key");
        for patch in [
            json!({ "metadata": { "labels": { "example.com/x": "y" } } }),
            json!({ "data": { "key": "eA==" } }),
            json!({ "metadata": { "annotations": { "example.com/x": "y" } } }),
        ] {
            refused(
                secrets.patch(record_key, &PatchParams::default(), &Patch::Merge(&patch)).await,
                Some(RECORD_KEY_UPDATED),
                &format!("updating the record key with {patch}"),
            );
        }
        let mut applied = record_key_secret(record_key);
        applied["apiVersion"] = json!("v1");
        applied["kind"] = json!("Secret");
        applied["data"]["key"] = json!(k8s_openapi::ByteString(vec![0; 32]));
        refused(
            secrets.patch(record_key, &PatchParams::apply("intruder").force(), &Patch::Apply(&applied)).await,
            Some(RECORD_KEY_UPDATED),
            "applying another key onto the record key",
        );
        assert_eq!(secrets.get(record_key).await.unwrap().data, stored.data, "the record key is unchanged");
    }

    /// Watching one namespace: no cluster-wide RBAC; the Role in the release namespace grants get on
    /// the record key and create (bounded by the policy), and nothing else on Secrets there.
    async fn creates_the_record_key_through_its_role_when_watching_one_namespace(&self) {
        let (cp, release_ns, team_ns, record_key) = (self.cp, &self.release_ns, &self.team_ns, &self.record_key);
        let watch = format!("watchNamespaces={{{team_ns}}}");
        let (ok, out, err) =
            helm(cp, &["upgrade", RELEASE, CHART, "-n", release_ns, "--reuse-values", "--set", &watch]);
        assert!(ok, "helm upgrade: {err}{out}");
        // The authorizer follows RBAC changes through its informers: wait until it has both the Role
        // and the ClusterRole's removal.
        let expected_secret_rules: BTreeSet<String> =
            ["/secrets: create".to_string(), format!("/secrets: get names=[\"{record_key}\"]")].into();
        wait_for("the namespaced record-key Role in effect", Duration::from_secs(30), || async {
            let rules = allowed_rules(&self.as_operator, release_ns).await;
            let secrets: BTreeSet<String> = rules.into_iter().filter(|r| r.starts_with("/secrets")).collect();
            (secrets == expected_secret_rules).then_some(())
        })
        .await;
        let secrets = &self.release_secrets;
        secrets.get(record_key).await.expect("the operator reads its record key");
        forbidden(secrets.list(&ListParams::default()).await, "listing the release namespace's Secrets");
        let as_admin = Api::<Secret>::namespaced(self.admin.clone(), release_ns);
        as_admin.delete(record_key, &DeleteParams::default()).await.unwrap();
        wait_for("the record key deleted", Duration::from_secs(30), || async {
            secrets.get_opt(record_key).await.unwrap().is_none().then_some(())
        })
        .await;
        secrets
            .create(&PostParams::default(), &secret_of(record_key_secret(record_key)))
            .await
            .expect("the operator creates its record key through the namespaced Role");
        forbidden(
            self.kube_system.create(&dry_run(), &secret_of(record_key_secret(record_key))).await,
            "a Secret in kube-system",
        );
        refused(
            secrets.create(&dry_run(), &test_secret("planted", json!({}), None)).await,
            Some(NOT_LABELLED),
            "another Secret in the release namespace",
        );
    }
}

// Why the chart's secret-write policy refuses what the operator never writes, and the record key's own
// rules (templates/validatingadmissionpolicy.yaml).
const NOT_OPAQUE: &str = "the operator writes only Secrets of type Opaque";
const SA_ANNOTATION: &str = "the operator never writes kubernetes.io/service-account.* annotations";
const NOT_ONLY_TOKEN: &str = "a token Secret holds exactly one data key, token";
const NOT_ONLY_KEY: &str = "the record key Secret holds exactly one data key, key";
const RECORD_KEY_OWNED: &str = "the record key Secret has no ownerReferences";
const RECORD_KEY_UPDATED: &str = "the record key Secret is created once and never updated";

fn secret_of(value: Value) -> Secret {
    serde_json::from_value(value).unwrap()
}

/// The record key Secret as the operator creates it (the contract of `RECORD_KEY_SECRET`): type Opaque,
/// data exactly `key` (32 random bytes), the operator's name and the record-key component as labels
/// (not the managed-by label of its token Secrets), no ownerReferences, no annotations.
fn record_key_secret(name: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "labels": { "app.kubernetes.io/name": "scim-token-operator", "app.kubernetes.io/component": "record-key" }
        },
        "type": "Opaque",
        "data": { "key": k8s_openapi::ByteString((0..32u8).map(|i| i.wrapping_mul(97) ^ 0x5c).collect()) }
    })
}

/// Asserts that a request was refused (403 or 422) before it reached storage: by the policy, or, when
/// `reason` is None, by whatever the API server says first. Nothing of an admitted result is printed.
fn refused<T>(result: kube::Result<T>, reason: Option<&str>, what: &str) {
    match (result, reason) {
        (Err(kube::Error::Api(status)), Some(reason)) => assert!(
            status.code == 403
                && status.message.contains("ValidatingAdmissionPolicy")
                && status.message.contains(reason),
            "{what} must be refused by the chart's ValidatingAdmissionPolicy ({reason:?}), got {status:?}"
        ),
        (Err(kube::Error::Api(status)), None) => {
            assert!([403, 422].contains(&status.code), "{what} must be refused, got {status:?}")
        }
        (Err(other), _) => panic!("{what} must be refused, got {other:?}"),
        (Ok(_), _) => panic!("{what} must be refused, but it was admitted"),
    }
}
