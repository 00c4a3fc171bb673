"""dealpulse: real-time sales-behaviour analytics on Kafka, Faust, River and ClickHouse."""

__version__ = "0.1.0"
