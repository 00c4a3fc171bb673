"""The Faust app, its agents, the embedded broker/store launchers and the `dealpulse` CLI."""
