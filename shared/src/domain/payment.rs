//! Payments: their states, the rules that move them, and the values a payment request may
//! carry. No I/O.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::InvalidValue;

/// Where a payment stands. PENDING → PAID_VERIFIED or FAILED; PAID_VERIFIED → REFUNDED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    Pending,
    PaidVerified,
    Failed,
    Refunded,
}

impl PaymentStatus {
    pub const ALL: [PaymentStatus; 4] = [
        PaymentStatus::Pending,
        PaymentStatus::PaidVerified,
        PaymentStatus::Failed,
        PaymentStatus::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "PENDING",
            PaymentStatus::PaidVerified => "PAID_VERIFIED",
            PaymentStatus::Failed => "FAILED",
            PaymentStatus::Refunded => "REFUNDED",
        }
    }
}

impl FromStr for PaymentStatus {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PaymentStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                InvalidValue::new(
                    "status",
                    "must be one of PENDING, PAID_VERIFIED, FAILED, REFUNDED",
                )
            })
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a payment was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationMethod {
    Manual,
    ProviderApi,
    BankReconciliation,
    /// By the provider's signed webhook (never chosen by an API caller).
    ProviderWebhook,
}

impl VerificationMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            VerificationMethod::Manual => "manual",
            VerificationMethod::ProviderApi => "provider_api",
            VerificationMethod::BankReconciliation => "bank_reconciliation",
            VerificationMethod::ProviderWebhook => "provider_webhook",
        }
    }

    /// What an internal caller may name in `verificationMethod`.
    pub fn parse_requested(s: &str) -> Result<Self, InvalidValue> {
        match s {
            "manual" => Ok(VerificationMethod::Manual),
            "provider_api" => Ok(VerificationMethod::ProviderApi),
            "bank_reconciliation" => Ok(VerificationMethod::BankReconciliation),
            _ => Err(InvalidValue::new(
                "verificationMethod",
                "must be one of manual, provider_api, bank_reconciliation",
            )),
        }
    }
}

impl FromStr for VerificationMethod {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "provider_webhook" => Ok(VerificationMethod::ProviderWebhook),
            other => Self::parse_requested(other),
        }
    }
}

/// What can be done to a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentAction {
    Verify,
    Fail,
    Refund,
}

impl PaymentAction {
    pub const ALL: [PaymentAction; 3] = [
        PaymentAction::Verify,
        PaymentAction::Fail,
        PaymentAction::Refund,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentAction::Verify => "verify",
            PaymentAction::Fail => "fail",
            PaymentAction::Refund => "refund",
        }
    }

    /// The event an accepted action publishes.
    pub fn event_type(self) -> &'static str {
        match self {
            PaymentAction::Verify => "payment.paid",
            PaymentAction::Fail => "payment.failed",
            PaymentAction::Refund => "payment.refunded",
        }
    }

    /// The outbox idempotency key of that event: one per fact, however often it is attempted.
    pub fn event_idempotency_key(self, payment_id: uuid::Uuid) -> String {
        let fact = match self {
            PaymentAction::Verify => "paid",
            PaymentAction::Fail => "failed",
            PaymentAction::Refund => "refunded",
        };
        format!("payment-{fact}-{payment_id}")
    }
}

/// What an action does to a payment in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Move to this state (and publish the action's event).
    Apply(PaymentStatus),
    /// The payment is already where the action would take it: answer with it, change nothing.
    AlreadyDone,
    /// Not allowed from this state; the code says why.
    Refuse(&'static str),
}

/// The state machine, whole.
pub fn decide(from: PaymentStatus, action: PaymentAction) -> Decision {
    use PaymentAction as A;
    use PaymentStatus as S;
    match (from, action) {
        (S::Pending, A::Verify) => Decision::Apply(S::PaidVerified),
        (S::Pending, A::Fail) => Decision::Apply(S::Failed),
        (S::PaidVerified, A::Refund) => Decision::Apply(S::Refunded),
        (S::PaidVerified, A::Verify) | (S::Failed, A::Fail) | (S::Refunded, A::Refund) => {
            Decision::AlreadyDone
        }
        (S::Failed, _) => Decision::Refuse("payment_failed"),
        (S::Refunded, _) => Decision::Refuse("payment_refunded"),
        (S::Pending, A::Refund) => Decision::Refuse("payment_not_paid"),
        (S::PaidVerified, A::Fail) => Decision::Refuse("payment_already_verified"),
    }
}

/// A currency code as written (`USD`): three capital letters. Whether it is a currency in
/// circulation is the catalog's (`currencies` table) to say.
pub fn parse_currency_code(raw: &str) -> Result<String, InvalidValue> {
    let upper = raw.trim().to_ascii_uppercase();
    if upper.len() == 3 && upper.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(upper)
    } else {
        Err(InvalidValue::new(
            "currency",
            "must be an ISO 4217 code such as USD",
        ))
    }
}

/// A payment provider's name: `stripe`, `adyen`, `bank-transfer`…
pub fn parse_provider(raw: &str) -> Result<String, InvalidValue> {
    let ok = raw.len() <= 32
        && raw.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(InvalidValue::new(
            "provider",
            "must be 1-32 of a-z, 0-9, '_' and '-', starting with a letter",
        ))
    }
}

/// Largest amount one payment may carry, in minor units: far beyond any real payment, far below
/// any sum that could overflow.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_and_action_has_one_decision() {
        use PaymentAction as A;
        use PaymentStatus as S;
        let expected = [
            (S::Pending, A::Verify, Decision::Apply(S::PaidVerified)),
            (S::Pending, A::Fail, Decision::Apply(S::Failed)),
            (S::Pending, A::Refund, Decision::Refuse("payment_not_paid")),
            (S::PaidVerified, A::Verify, Decision::AlreadyDone),
            (
                S::PaidVerified,
                A::Fail,
                Decision::Refuse("payment_already_verified"),
            ),
            (S::PaidVerified, A::Refund, Decision::Apply(S::Refunded)),
            (S::Failed, A::Verify, Decision::Refuse("payment_failed")),
            (S::Failed, A::Fail, Decision::AlreadyDone),
            (S::Failed, A::Refund, Decision::Refuse("payment_failed")),
            (S::Refunded, A::Verify, Decision::Refuse("payment_refunded")),
            (S::Refunded, A::Fail, Decision::Refuse("payment_refunded")),
            (S::Refunded, A::Refund, Decision::AlreadyDone),
        ];
        assert_eq!(expected.len(), S::ALL.len() * A::ALL.len());
        for (from, action, decision) in expected {
            assert_eq!(decide(from, action), decision, "{from} {action:?}");
        }
    }

    #[test]
    fn values_round_trip_and_refuse_garbage() {
        for s in PaymentStatus::ALL {
            assert_eq!(s.as_str().parse::<PaymentStatus>().unwrap(), s);
        }
        assert!("paid".parse::<PaymentStatus>().is_err());
        assert_eq!(parse_currency_code("usd").unwrap(), "USD");
        for bad in ["US", "USDX", "U$D", "", "ÜSD"] {
            assert!(parse_currency_code(bad).is_err(), "{bad}");
        }
        assert!(parse_provider("stripe").is_ok());
        for bad in ["Stripe", "1stripe", "", "a b", &"a".repeat(33)] {
            assert!(parse_provider(bad).is_err(), "{bad}");
        }
        assert!(VerificationMethod::parse_requested("provider_webhook").is_err());
        assert_eq!(
            "provider_webhook".parse::<VerificationMethod>().unwrap(),
            VerificationMethod::ProviderWebhook
        );
        assert_eq!(
            PaymentAction::Verify.event_idempotency_key(uuid::Uuid::nil()),
            "payment-paid-00000000-0000-0000-0000-000000000000"
        );
    }
}
