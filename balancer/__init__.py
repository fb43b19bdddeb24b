"""pipeline-balancer: a load balancer for Intel DL Streamer Pipeline Server workers."""

__version__ = "0.1.0"
