//! End-to-end test harness: a real kube-apiserver + etcd (built from their Go modules by
//! `e2e/build-bins.sh`), a test PKI, the CRDs, and helpers for the tests in `e2e/tests/`.
//!
//! One control plane per test binary (`ControlPlane::shared()`), tests isolated by
//! namespace. Children die with the test process (PR_SET_PDEATHSIG), and whatever a killed
//! run left behind is removed by the next one.

pub mod bins;
pub mod cluster;
pub mod nodesim;
pub mod pki;
pub mod proc;
pub mod tls;

pub use cluster::{ControlPlane, TestNamespace, free_port};
pub mod rbac;
pub mod webhooks;
