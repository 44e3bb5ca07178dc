//! gRPC contract between router and shards (arrives with the serving issue).
