package agent

import (
	"github.com/gwagent/gwagent/agent/status"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/telemetry"
)

// Condition is a named health problem (tailscale's Warnable idea): set with
// a reason, cleared when it is over. The status tracker (agent/status)
// keeps them; these are the agent's own names.
type Condition = condition.Name

const (
	CondClockNotSynced      Condition = "clock-not-synchronised"
	CondOnboardingRejected  Condition = "onboarding-credential-rejected"
	CondKeyStoreUnavailable Condition = "key-store-unavailable"
	CondCertificateExpired  Condition = "certificate-expired"
	CondHubUnreachable      Condition = "hub-unreachable"
	CondProvisioningFailed  Condition = "provisioning-failed"
	CondOutboxFull          Condition = telemetry.CondOutboxFull
	// CondHubQuota and CondSendSlowed: the hub refuses messages as over
	// its daily quota, or slows or throttles them (telemetry/pipeline.go).
	CondHubQuota   Condition = telemetry.CondHubQuota
	CondSendSlowed Condition = telemetry.CondSendSlowed
)

// SpoolRejectedKeep is how many refused spool files rejected/ keeps, the
// newest (telemetry.RejectedKeep).
const SpoolRejectedKeep = telemetry.RejectedKeep

// Status is what status.json holds (agent/status).
type Status = status.Status

// ReadStatus reads the status file a running (or stopped) agent wrote.
func ReadStatus(stateDir string) (*Status, error) { return status.Read(stateDir) }

// CondSpoolPolled and CondConfigPolled: a directory the agent must notice
// changes in could not be watched with inotify, so it is scanned on a timer
// instead. Spool files and config changes are still picked up, a little later.
const (
	CondSpoolPolled  Condition = telemetry.CondSpoolPolled
	CondConfigPolled Condition = "config-polled"
)
