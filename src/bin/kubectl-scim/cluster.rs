//! kubectl's connection flags, the client they make, and API errors turned into one clear line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use k8s_openapi::api::core::v1::Secret;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use scim_token_operator::api::ScimDirectory;

/// The kubectl flags every command honours (kubectl hands a plugin every argument after its name).
#[derive(Args, Debug, Clone, Default)]
pub struct ConnectionArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The kubeconfig cluster to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub cluster: Option<String>,
    /// The kubeconfig user to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub user: Option<String>,
    /// The namespace (default: the context's namespace).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Username to impersonate for the operation.
    #[arg(long = "as", global = true, value_name = "USER")]
    pub as_user: Option<String>,
    /// Group to impersonate for the operation (repeatable).
    #[arg(long = "as-group", global = true, value_name = "GROUP")]
    pub as_group: Vec<String>,
}

/// A connected client and where it points.
pub struct Cluster {
    pub client: Client,
    /// The namespace commands work in (`-n`, else the context's).
    pub namespace: String,
    server: String,
}

impl Cluster {
    pub async fn connect(args: &ConnectionArgs) -> anyhow::Result<Cluster> {
        let options =
            KubeConfigOptions { context: args.context.clone(), cluster: args.cluster.clone(), user: args.user.clone() };
        let mut config = match &args.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| anyhow::anyhow!("cannot read kubeconfig {}: {}", path.display(), one_line(&e)))?;
                Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| anyhow::anyhow!("kubeconfig {}: {}", path.display(), one_line(&e)))?
            }
            None if options.context.is_some() || options.cluster.is_some() || options.user.is_some() => {
                Config::from_kubeconfig(&options).await.map_err(|e| anyhow::anyhow!("kubeconfig: {}", one_line(&e)))?
            }
            None => Config::infer().await.map_err(|_| {
                anyhow::anyhow!(
                    "no cluster configured: no kubeconfig ($KUBECONFIG or ~/.kube/config) and not running in a \
                     cluster; pass --kubeconfig"
                )
            })?,
        };
        if let Some(user) = &args.as_user {
            config.auth_info.impersonate = Some(user.clone());
        }
        if !args.as_group.is_empty() {
            config.auth_info.impersonate_groups = Some(args.as_group.clone());
        }
        // An unreachable address fails in seconds, not after the default 30.
        config.connect_timeout = Some(Duration::from_secs(10));
        let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let server = config.cluster_url.to_string().trim_end_matches('/').to_owned();
        let client = Client::try_from(config).map_err(|e| {
            if e.to_string().contains("UnsupportedCertVersion") {
                anyhow::anyhow!(
                    "the kubeconfig's client certificate is X.509 version 1, which this tool's TLS library refuses; \
                     issue it as version 3 (any -extfile with openssl x509 -req)"
                )
            } else {
                anyhow::anyhow!("cannot build a client from the kubeconfig: {}", one_line(&e))
            }
        })?;
        Ok(Cluster { client, namespace, server })
    }

    pub fn directories(&self) -> Api<ScimDirectory> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn namespaced<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// `ScimDirectory "acme" in namespace "tenants"`, for messages.
    pub fn directory_ref(&self, name: &str) -> String {
        format!("ScimDirectory {name:?} in namespace {:?}", self.namespace)
    }

    /// One line saying what went wrong with a request about `what` (e.g. [`Cluster::directory_ref`]).
    pub fn fail(&self, error: kube::Error, what: &str) -> anyhow::Error {
        anyhow::anyhow!(describe(&error, what, &self.server))
    }

    /// As [`Cluster::fail`], for a watch.
    pub fn fail_watch(&self, error: kube::runtime::watcher::Error, what: &str) -> anyhow::Error {
        use kube::runtime::watcher::Error as W;
        match error {
            W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => self.fail(e, what),
            W::WatchError(status) => self.fail(kube::Error::Api(status), what),
            other => anyhow::anyhow!("watching {what}: {}", one_line(&other)),
        }
    }
}

/// The message for a failed request about `what`, on one line. Pure, for the tests.
pub fn describe(error: &kube::Error, what: &str, server: &str) -> String {
    match error {
        kube::Error::Api(status) => match status.code {
            404 if status.message.contains("could not find the requested resource") => format!(
                "the API server at {server} does not serve {what}: is the ScimDirectory CRD \
                 (scimdirectories.scim.tokenops.dev) installed?"
            ),
            404 => format!("{what} not found"),
            403 => format!("forbidden: {}", flatten(&status.message)),
            401 => format!(
                "the API server at {server} refused the credentials (401 Unauthorized): log in again or check \
                 --kubeconfig/--context"
            ),
            code => format!("{what}: the API server answered {code} {}: {}", status.reason, flatten(&status.message)),
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            format!("cannot reach the Kubernetes API server at {server}: {}", root_cause(error))
        }
        other => format!("{what}: {}", one_line(other)),
    }
}

/// The innermost cause of an error (e.g. `Connection refused (os error 111)`), on one line.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    flatten(&cause.to_string())
}

/// An error and its causes on one line.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![flatten(&error.to_string())];
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = flatten(&e.to_string());
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = e.source();
    }
    parts.join(": ")
}

fn flatten(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status::failure(message, reason).with_code(code)))
    }

    #[test]
    fn api_errors_read_as_one_line() {
        let what = r#"ScimDirectory "acme" in namespace "t""#;
        let server = "https://127.0.0.1:6443";
        assert_eq!(
            describe(&api(404, "NotFound", r#"scimdirectories "acme" not found"#), what, server),
            r#"ScimDirectory "acme" in namespace "t" not found"#
        );
        assert!(
            describe(&api(404, "NotFound", "the server could not find the requested resource"), what, server)
                .contains("is the ScimDirectory CRD")
        );
        let forbidden = describe(
            &api(403, "Forbidden", "scimdirectories.scim.tokenops.dev \"acme\" is forbidden:\nUser \"bob\" cannot get"),
            what,
            server,
        );
        assert_eq!(
            forbidden,
            r#"forbidden: scimdirectories.scim.tokenops.dev "acme" is forbidden: User "bob" cannot get"#
        );
        assert!(describe(&api(401, "Unauthorized", "Unauthorized"), what, server).contains("refused the credentials"));
        assert!(!describe(&api(500, "InternalError", "a\nb"), what, server).contains('\n'));
    }
}
