//! (e2e helper) placeholder
