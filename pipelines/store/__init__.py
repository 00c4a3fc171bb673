"""ClickHouse store: numbered migrations, the client factory and the batch writer."""
