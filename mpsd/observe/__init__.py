"""What mpsd tells the outside: Prometheus metrics, engine scrapes, sd_notify, the status page."""
