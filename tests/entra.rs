//! Issue 24: every new token of a directory with `spec.identityProvider.entra` is pushed to Microsoft
//! Entra ID, proven before the old one dies. Entra cannot be reached from here: the end-to-end tests
//! run against the Microsoft Graph test double (tests/support/graph.rs), which follows the published
//! contract in ../shared/specs and has never been run against a real tenant (docs/entra.md).

mod support;

use support::Env;

const EXAMPLE: &str = include_str!("../examples/entra.yaml");

/// What CEL can check is checked at admission, naming the field.
#[tokio::test]
async fn entra_settings_are_validated_at_admission() {
    let env = Env::new("entra-admission").await;
    let (ok, _, err) = env.apply(EXAMPLE);
    assert!(ok, "the example is admitted: {err}");
    let good = EXAMPLE.replace("name: contoso", "name: probe");
    for (from, to, field) in [
        ("tenantId: 11111111-1111-1111-1111-111111111111", "tenantId: contoso.onmicrosoft.com", "tenantId"),
        ("servicePrincipalId: 22222222-2222-2222-2222-222222222222", "servicePrincipalId: 2222", "servicePrincipalId"),
        (
            "baseAddress: https://scim.example.com/scim/v2",
            "baseAddress: http://scim.example.com/scim/v2",
            "baseAddress",
        ),
        ("baseAddress: https://scim.example.com/scim/v2", "baseAddress: https:///scim", "baseAddress"),
        (
            "        workloadIdentity:\n          clientId: 33333333-3333-3333-3333-333333333333\n",
            "        {}\n",
            "exactly one of workloadIdentity and clientSecret",
        ),
        (
            "        workloadIdentity:\n          clientId: 33333333-3333-3333-3333-333333333333\n",
            "        workloadIdentity:\n          clientId: 33333333-3333-3333-3333-333333333333\n        clientSecret:\n          clientId: 33333333-3333-3333-3333-333333333333\n          secretRef: { name: entra-app, key: client-secret }\n",
            "exactly one of workloadIdentity and clientSecret",
        ),
        // Another namespace's Secret cannot even be named.
        (
            "        workloadIdentity:\n          clientId: 33333333-3333-3333-3333-333333333333\n",
            "        clientSecret:\n          clientId: 33333333-3333-3333-3333-333333333333\n          secretRef: { name: entra-app, namespace: other, key: client-secret }\n",
            "namespace",
        ),
        ("      tenantId:", "      jobId: \"bad job\"\n      tenantId:", "jobId"),
    ] {
        assert!(good.contains(from), "{from}");
        let (ok, _, err) = env.apply(&good.replacen(from, to, 1));
        assert!(!ok, "{to:?} must be rejected");
        assert!(err.contains(field), "rejection of {to:?} names {field}: {err}");
    }
    let (ok, _, err) =
        env.apply(&good.replace("    entra:\n", "    entra:\n      jobId: scim.0123456789abcdef.abc-1\n"));
    assert!(ok, "a job id: {err}");
    let (ok, _, err) = env.apply("apiVersion: scim.tokenops.dev/v1alpha1\nkind: ScimDirectory\nmetadata:\n  name: none\nspec:\n  identityProvider: {}\n");
    assert!(!ok && err.contains("exactly one provider"), "{err}");
}
