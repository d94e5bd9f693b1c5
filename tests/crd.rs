//! crds/scimdirectory.yaml is generated from the Rust types, and the Helm chart ships a copy of it;
//! these fail when either is stale.

const CRD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/scimdirectory.yaml");
const CHART_CRD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/scim-token-operator/crds/scimdirectory.yaml");
const HOW: &str = "regenerate both with `UPDATE_CRDS=1 cargo test --test crd`";

fn check(path: &str) {
    let generated = scim_token_operator::cli::crd_yaml();
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(checked_in == generated, "{path} is stale: {HOW}");
}

#[test]
fn checked_in_crd_matches_the_rust_types() {
    check(CRD);
}

#[test]
fn chart_crd_matches_the_rust_types() {
    check(CHART_CRD);
}
