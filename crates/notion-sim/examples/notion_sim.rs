//! A stand-alone `notion-sim`, argument-compatible with `tokenkeeper notion-sim`, for measuring
//! the simulator alone (`cargo run --release -p notion-sim --example notion_sim -- notion-sim …`).

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Run the simulator.
    NotionSim(notion_sim::SimArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::NotionSim(args) = Cli::parse().command;
    notion_sim::run_cli(args).await
}
