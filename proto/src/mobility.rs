//! (agent helper) placeholder
