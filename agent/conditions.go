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
)

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
