//! `activeDeadlineSeconds`: a pod that has been active on the node for longer is ended by the
//! kubelet (phase Failed, reason `DeadlineExceeded`), as upstream's active deadline handler
//! does. Pure.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::pod_status::Ending;

/// The reason of a pod past its active deadline.
pub const REASON: &str = "DeadlineExceeded";
/// Its message, in upstream's words.
pub const MESSAGE: &str = "Pod was active on the node longer than the specified deadline";

/// Whether `pod`, started at `start` (its status' `startTime`), is past its active deadline at
/// `now`. A pod without a deadline or not started yet never is.
pub fn past(pod: &Pod, start: Option<&Time>, now: Timestamp) -> bool {
    let Some(deadline) = pod.spec.as_ref().and_then(|s| s.active_deadline_seconds) else {
        return false;
    };
    let Some(start) = start else {
        return false;
    };
    let active = now.as_second().saturating_sub(start.0.as_second());
    active >= deadline
}

/// How the kubelet ends a pod past its deadline.
pub fn ending() -> Ending {
    Ending {
        reason: REASON.into(),
        message: MESSAGE.into(),
        condition: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    fn pod(deadline: Option<i64>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                active_deadline_seconds: deadline,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn a_pod_is_past_its_deadline_once_active_that_long() {
        let start = Time(at(1_000));
        assert!(!past(&pod(Some(5)), Some(&start), at(1_004)));
        assert!(past(&pod(Some(5)), Some(&start), at(1_005)));
        assert!(past(&pod(Some(5)), Some(&start), at(9_000)));
    }

    #[test]
    fn no_deadline_or_no_start_time_is_never_past() {
        let start = Time(at(1_000));
        assert!(!past(&pod(None), Some(&start), at(99_999)));
        assert!(!past(&pod(Some(1)), None, at(99_999)));
    }
}
