//! crds/scimdirectory.yaml is generated from the Rust types; this fails when it is stale.

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/scimdirectory.yaml");
    let generated = scim_token_operator::cli::crd_yaml();
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(path, &generated).unwrap();
        return;
    }
    assert!(
        checked_in == generated,
        "{path} is stale: regenerate it with `UPDATE_CRDS=1 cargo test --test crd` (or `cargo run -- crd > crds/scimdirectory.yaml`)"
    );
}
