//! Export of the groups' figures (Prometheus text exposition).
