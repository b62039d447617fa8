package agent

import (
	"errors"
	"fmt"
	"time"

	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/provisioning"
)

// CondThrottled: DPS or the hub is throttling the device (condition.Throttled).
const CondThrottled = condition.Throttled

// onProvisionStep raises CondThrottled while DPS answers 429.
func (a *Agent) onProvisionStep(s provisioning.Step) {
	var de *provisioning.DPSError
	if s.Kind == provisioning.StepRetrying && errors.As(s.Err, &de) && de.Status == 429 {
		a.status.Raise(CondThrottled, fmt.Sprintf("DPS throttled the registration (429); retrying in %s as it asked", s.Wait.Round(time.Second)))
	}
}
