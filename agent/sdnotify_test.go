package agent

import (
	"testing"
	"time"
)

// The heartbeat holds while the agent keeps its promises (a long planned
// wait included) and fails once it is overdue: then systemd's watchdog is
// no longer fed and restarts a stuck agent.
func TestHeartbeatStopsWhenStuck(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	h := newHeartbeat(func() time.Time { return now })
	if ok, _ := h.ok(); !ok {
		t.Fatal("a fresh heartbeat must hold")
	}
	h.alive(10 * time.Minute) // e.g. DPS asked for a long retry-after
	now = now.Add(9 * time.Minute)
	if ok, _ := h.ok(); !ok {
		t.Fatal("a planned wait must count as progress")
	}
	h.alive(time.Second) // a shorter promise never shortens a longer one
	now = now.Add(59 * time.Second)
	if ok, _ := h.ok(); !ok {
		t.Fatal("the longer promise was shortened")
	}
	now = now.Add(2 * time.Second)
	ok, since := h.ok()
	if ok {
		t.Fatal("an overdue agent must stop feeding the watchdog")
	}
	if want := time.Unix(1_700_000_000, 0).Add(10 * time.Minute); !since.Equal(want) {
		t.Fatalf("overdue since %v, want %v", since, want)
	}
}
