//! hostnic-ipamd: parse the config, start the allocator, serve the plugins until SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use hostnic_ipamd::config::{read_file, resolve, FileConfig, Flags};
use hostnic_ipamd::{server, Allocator};
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let flags = Flags::parse();
    let file = match &flags.config {
        Some(path) => read_file(path)?,
        None => FileConfig::default(),
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string());
    let config = resolve(flags, file, hostname)?;
    let allocator = Allocator::start(&config.store, &config.node_name)
        .await
        .context("starting the allocator")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    server::serve(Arc::new(allocator), &config.socket, shutdown).await
}
