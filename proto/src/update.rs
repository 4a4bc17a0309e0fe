//! (IMS helper) placeholder
