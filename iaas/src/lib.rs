//! QingCloud IaaS API (issue: QingCloud NICs).
