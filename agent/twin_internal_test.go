package agent

import (
	"encoding/json"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/gwagent/gwagent/agent/health"
)

// The MQTT client runs each desired-properties notification on a
// goroutine of its own, so two updates sent in order may be applied in
// either order (and the sync's full read may come after a newer
// notification). Here they are fed in the bad order directly, as the race
// would: an older version never undoes a newer one.
func TestDesiredAppliedInVersionOrder(t *testing.T) {
	a := &Agent{log: slog.New(slog.NewTextHandler(io.Discard, nil)), health: health.New(time.Hour, health.Deps{})}
	iv := a.health.Interval

	a.onDesired(json.RawMessage(`{"telemetryInterval":9,"$version":3}`), 3)
	a.onDesired(json.RawMessage(`{"telemetryInterval":7,"$version":2}`), 2)
	if iv() != 9*time.Second {
		t.Fatalf("interval %v after versions 3 (9 s) then 2 (7 s) arrived; want 9s", iv())
	}
	// The full document read before version 3 arrives late too.
	if a.applyDesired(json.RawMessage(`{"telemetryInterval":7,"$version":2}`), 2) || iv() != 9*time.Second {
		t.Fatalf("an older full read was applied: interval %v", iv())
	}
	// A newer patch of another property, then a late older one that sets
	// the interval: the interval was not touched since, so it applies.
	a.onDesired(json.RawMessage(`{"other":1,"$version":5}`), 5)
	a.onDesired(json.RawMessage(`{"telemetryInterval":4,"$version":4}`), 4)
	if iv() != 4*time.Second {
		t.Fatalf("interval %v; want 4s from version 4 (version 5 did not set it)", iv())
	}
	if a.desired.latest != 5 {
		t.Fatalf("latest desired version %d, want 5 (reported as av)", a.desired.latest)
	}
	a.onDesired(json.RawMessage(`{"telemetryInterval":11,"$version":6}`), 6)
	if iv() != 11*time.Second {
		t.Fatalf("interval %v; want 11s from version 6", iv())
	}
}
