#[tokio::main]
async fn main() -> anyhow::Result<()> {
    scim_token_operator::cli::main().await
}
