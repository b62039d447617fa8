package agent

import (
	"errors"
	"fmt"
	"time"

	"github.com/gwagent/gwagent/provisioning"
)

// CondThrottled: DPS or the hub is throttling the device (429, or CONNACK
// 3 which the hub also sends at its connection-rate limit); gwagent waits as
// asked (retry-after) or backs off, never in a tight loop.
const CondThrottled Condition = "throttled"

// onProvisionStep raises CondThrottled while DPS answers 429.
func (a *Agent) onProvisionStep(s provisioning.Step) {
	var de *provisioning.DPSError
	if s.Kind == provisioning.StepRetrying && errors.As(s.Err, &de) && de.Status == 429 {
		a.status.Raise(CondThrottled, fmt.Sprintf("DPS throttled the registration (429); retrying in %s as it asked", s.Wait.Round(time.Second)))
	}
}
