package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/telemetry"
)

// packedReadings unpacks what the hub received from deviceID: for each
// reading (a body with "pk"), its number and the id a receiver
// deduplicates it by (its entry in gwagent-ids, or the $.mid of a message
// that travelled alone).
func packedReadings(az *azsimtest.Azsim, deviceID string) (nums []int, ids []string) {
	for _, m := range az.Telemetry() {
		if m["deviceId"] != deviceID {
			continue
		}
		props, _ := m["properties"].(map[string]any)
		app, _ := props["application"].(map[string]any)
		sys, _ := props["system"].(map[string]any)
		bodies := []any{m["body"]}
		msgIDs := []string{fmt.Sprint(sys["$.mid"])}
		if _, packed := app[telemetry.PackedProperty]; packed {
			bodies, _ = m["body"].([]any)
			msgIDs = strings.Split(fmt.Sprint(app[telemetry.PackedIDsProperty]), ",")
		}
		for i, b := range bodies {
			if v, ok := b.(map[string]any)["pk"].(float64); ok && i < len(msgIDs) {
				nums, ids = append(nums, int(v)), append(ids, msgIDs[i])
			}
		}
	}
	return nums, ids
}

// A SIGKILL in the middle of a packed drain: every reading arrives, and
// every copy sent again carries the same id as the first (a receiver that
// deduplicates by the ids in gwagent-ids keeps each reading once); spool
// files leave the spool only once the packed message that carried them
// was acknowledged, so the spool is empty at the end.
func TestSIGKILLMidPackedDrain(t *testing.T) {
	const n = 6000
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-crash-packed", "pack = true\nmax_rate = 0\n")
	for i := range n {
		p := filepath.Join(d.spool, fmt.Sprintf("p%04d.json", i))
		os.WriteFile(p, []byte(fmt.Sprintf(`{"pk":%d,"v":"%s"}`, i, strings.Repeat("x", 80))), 0o644)
	}
	cmd := d.start()
	testenv.Eventually(t, 60*time.Second, "the first packed messages", func() bool {
		nums, _ := packedReadings(az, "gw-crash-packed")
		return len(nums) >= 200
	})
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	before, _ := packedReadings(az, "gw-crash-packed")
	d.start()
	testenv.Eventually(t, 90*time.Second, "every reading after the restart", func() bool {
		nums, _ := packedReadings(az, "gw-crash-packed")
		seen := map[int]bool{}
		for _, v := range nums {
			seen[v] = true
		}
		return len(seen) == n
	})
	nums, ids := packedReadings(az, "gw-crash-packed")
	idOf, copies := map[int]string{}, 0
	for i, v := range nums {
		if first, ok := idOf[v]; ok {
			copies++
			if ids[i] != first {
				t.Fatalf("reading %d sent again under id %s, first under %s: a receiver cannot drop the copy", v, ids[i], first)
			}
			continue
		}
		idOf[v] = ids[i]
	}
	t.Logf("%d readings arrived before the SIGKILL, %d copies sent again after it", len(before), copies)
	// What a SIGKILL sends again is what was in flight: the window of 256
	// messages (packed ones count their members). Acknowledged ones whose
	// spool files had not left yet have their receipts in the outbox.
	if copies > 256 {
		t.Fatalf("%d copies sent again after one SIGKILL, more than the window (256)", copies)
	}
	testenv.Eventually(t, 10*time.Second, "the spool emptied", func() bool {
		m, _ := filepath.Glob(filepath.Join(d.spool, "*.json"))
		return len(m) == 0
	})
}
