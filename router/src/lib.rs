//! HTTP router (arrives with the serving issue).
