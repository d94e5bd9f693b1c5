fn main() -> anyhow::Result<()> {
    // Before the runtime's threads: allocator parameters are process-wide.
    scim_token_operator::allocator::tune();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(scim_token_operator::cli::main())
}
