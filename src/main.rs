//! The `nixery` command: reads the configuration, wires the modules
//! together and serves the registry until SIGINT or SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use nixery::builder::{Builder, Settings};
use nixery::config::{Cli, Command, LogFormat, ServeConfig, StorageConfig};
use nixery::layers::Popularity;
use nixery::nix::Nix;
use nixery::server;
use nixery::storage::Storage;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    init_logging(args.log_format);
    let config = args.check()?;
    serve(config).await
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let storage = match &config.storage {
        StorageConfig::Filesystem(root) => Storage::filesystem(root)
            .await
            .with_context(|| format!("cannot use STORAGE_PATH {}", root.display()))?,
    };
    let popularity = match &config.popularity_url {
        Some(url) => Popularity::load(url).await?,
        None => Popularity::default(),
    };
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let settings = Settings {
        layer_budget: config.layer_budget,
        gzip_level: config.gzip_level,
        parallel,
        architectures: config.architectures,
        preferred_format: config.manifest_format,
    };
    let builder = Builder::new(
        config.source,
        Nix::new(config.nix_timeout),
        storage,
        popularity,
        settings,
    );

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "nixery is serving");
    eprintln!(
        "nixery is serving on http://{address}\n  pull an image: skopeo copy --src-tls-verify=false docker://{address}/shell/hello oci:hello:latest\n  or:            docker pull {address}/shell/hello"
    );
    axum::serve(listener, server::router(Arc::clone(&builder)))
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
