//! (host-prep helper) placeholder
