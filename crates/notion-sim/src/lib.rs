//! notion-sim: a faithful, stateful simulator of Notion's OAuth endpoints and a slice of its REST API.
//!
//! This file is replaced by the simulator's real entry points (see issue 3); until then it only
//! fixes the two names the `tokenkeeper notion-sim` subcommand relies on.

/// Command-line settings of `tokenkeeper notion-sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {}

/// Runs the simulator until Ctrl-C.
pub async fn run_cli(_args: SimArgs) -> anyhow::Result<()> {
    anyhow::bail!("notion-sim is not built yet")
}
