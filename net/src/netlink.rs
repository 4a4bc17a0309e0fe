//! (net helper) placeholder
