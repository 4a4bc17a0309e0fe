//! (lead) placeholder
