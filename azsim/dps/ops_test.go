package dps

import (
	"strconv"
	"testing"
	"time"
)

// A client registering in a loop cannot grow DPS's operations without
// bound: past the limit the expired go first, then the oldest.
func TestPruneOps(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	d := &DPS{ops: map[string]*operation{}, opsMax: 10}
	add := func(id string, at time.Time) {
		d.ops[id] = &operation{id: id, created: at}
		d.pruneOps(now)
	}
	add("expired", now.Add(-2*opTTL))
	for i := range 10 {
		add("op"+strconv.Itoa(i), now.Add(time.Duration(i)*time.Second))
	}
	if len(d.ops) != 10 || d.ops["expired"] != nil {
		t.Fatalf("after 11 operations with a limit of 10: %d kept, expired kept: %v", len(d.ops), d.ops["expired"] != nil)
	}
	for i := 10; i < 1000; i++ {
		add("op"+strconv.Itoa(i), now.Add(time.Duration(i)*time.Second))
		if len(d.ops) > 10 {
			t.Fatalf("%d operations kept, limit 10", len(d.ops))
		}
	}
	if d.ops["op999"] == nil || d.ops["op998"] == nil {
		t.Fatal("the newest operations were dropped")
	}
}
