package agent_test

// End-to-end tests of living within the hub's limits (issue 19): the send
// budget and its adaptation against azsim's device-to-cloud throttle, the
// hold on connections while the daily quota is used up, and packing.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/azsim/hub"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/telemetry"
)

// reading is one application reading as the cloud sees it, unpacked from
// a packed message where it travelled in one.
type reading struct {
	n      int       // the reading's "n"
	id     string    // the id a receiver deduplicates by
	at     time.Time // when the hub took the message that carried it
	packed int       // members of the message that carried it (1: unpacked)
	sys    map[string]any
	app    map[string]any
}

// records reads azsim's telemetry log for deviceID.
func records(t *testing.T, az *azsimtest.Azsim, deviceID string) []hub.TelemetryRecord {
	t.Helper()
	var out []hub.TelemetryRecord
	for _, line := range az.TelemetryLines() {
		if !bytes.Contains(line, []byte(`"deviceId":"`+deviceID+`"`)) {
			continue
		}
		var r hub.TelemetryRecord
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("telemetry log: %v", err)
		}
		out = append(out, r)
	}
	return out
}

// logLines counts the hub's records for deviceID without parsing them (a
// cheap poll).
func logLines(az *azsimtest.Azsim, deviceID string) int {
	b, _ := os.ReadFile(az.TelemetryLog)
	return bytes.Count(b, []byte(`"deviceId":"`+deviceID+`"`))
}

// readings unpacks the application readings (bodies with "n") that the
// hub received from deviceID, in the order it took them; health messages
// are left out.
func readings(t *testing.T, az *azsimtest.Azsim, deviceID string) []reading {
	t.Helper()
	var out []reading
	for _, r := range records(t, az, deviceID) {
		if r.Properties.Application["type"] == "health" {
			continue
		}
		mid, _ := r.Properties.System["$.mid"].(string)
		if cnt, ok := r.Properties.Application[telemetry.PackedProperty].(string); ok {
			arr, _ := r.Body.([]any)
			ids := strings.Split(fmt.Sprint(r.Properties.Application[telemetry.PackedIDsProperty]), ",")
			if strconv.Itoa(len(arr)) != cnt || len(ids) != len(arr) {
				t.Fatalf("packed message %s: %s = %s, %d ids, %d bodies", mid, telemetry.PackedProperty, cnt, len(ids), len(arr))
			}
			for i, b := range arr {
				n, _ := b.(map[string]any)["n"].(float64)
				out = append(out, reading{n: int(n), id: ids[i], at: r.ReceivedAt, packed: len(arr), sys: r.Properties.System, app: r.Properties.Application})
			}
			continue
		}
		if b, ok := r.Body.(map[string]any); ok {
			if n, ok := b["n"].(float64); ok {
				out = append(out, reading{n: int(n), id: mid, at: r.ReceivedAt, packed: 1, sys: r.Properties.System, app: r.Properties.Application})
			}
		}
	}
	return out
}

// tally counts what arrived of readings 0..n-1: lost, and copies beyond
// the first (by reading, and by the id a receiver deduplicates by).
func tally(rs []reading, n int) (lost, dups, dupIDs int) {
	seen, ids := map[int]bool{}, map[string]bool{}
	for _, r := range rs {
		if seen[r.n] {
			dups++
		}
		if ids[r.id] {
			dupIDs++
		}
		seen[r.n], ids[r.id] = true, true
	}
	for i := range n {
		if !seen[i] {
			lost++
		}
	}
	return lost, dups, dupIDs
}

// spoolReadings writes n readings into the spool of a stopped agent (the
// backlog of an outage), each about size bytes of JSON.
func spoolReadings(t *testing.T, d *device, n, size int) {
	t.Helper()
	dir := d.cfg.Telemetry.SpoolDir
	if err := os.MkdirAll(dir, 0o770); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		testenv.SpoolPut(t, dir, fmt.Sprintf("r%05d.json", i), readingBody(i, size))
	}
}

// readingBody is reading i as size bytes of JSON (at least its number).
func readingBody(i, size int) []byte {
	b := fmt.Appendf(nil, `{"n":%d,"pad":""}`, i)
	if pad := size - len(b); pad > 0 {
		b = fmt.Appendf(nil, `{"n":%d,"pad":"%s"}`, i, strings.Repeat("x", pad))
	}
	return b
}

// overBudget is by how many messages the arrivals at times ran ahead of
// rate per second at their worst: the largest (j-i) - rate*(t_j-t_i) over
// all i < j.
func overBudget(times []time.Time, rate float64) float64 {
	sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
	worst, low := 0.0, 0.0
	for j, at := range times {
		f := float64(j) - rate*at.Sub(times[0]).Seconds()
		if j > 0 {
			worst = max(worst, f-low)
		}
		low = min(low, f)
	}
	return worst
}

// An 8,000-message backlog against an S1 hub. The hub's rate is part of
// the test: S1's 100 messages/s would take 80 s, so azsim's hub runs at
// 500/s (its one-second burst is then 500 messages) with a 50 ms backlog
// instead of 10 s, which stands for a hub whose backlog the rest of the
// fleet already fills: a single unpaced gateway with 256 messages in
// flight then overflows it, as a fleet overflows a real S1 hub's. 500/s is
// well below what an unpaced agent sends even under the race detector on
// a loaded machine (1,100/s seen; at 2,000/s it sometimes never
// throttled). The budget is 400/s, below the hub's rate as the default
// 10/s is below S1's 100/s.
//
//   - paced: nothing lost, nothing sent twice, never more than the budget
//     plus the hub's burst allowance, no throttling disconnect; health
//     messages (every 2 s) arrive during the drain, not after it;
//   - max_rate = 0: the hub throttles (429002: the connection closes,
//     held messages are dropped unacknowledged), and still nothing is lost.
func TestBacklogAgainstS1E2E(t *testing.T) {
	const n, hubRate, budget = 8_000, 500, 400.0
	for _, tc := range []struct {
		name    string
		maxRate float64
	}{{"ok/max_rate below the hub's rate", budget}, {"ok/max_rate 0", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			az := azsimtest.Start(t, azsim.Config{HubTier: "S1", HubD2CRate: hubRate, HubD2CBacklog: 50 * time.Millisecond})
			reg := "gw-backlog-paced"
			if tc.maxRate == 0 {
				reg = "gw-backlog-unpaced"
			}
			d := newDevice(t, az, devOpts{regID: reg, symmetric: true,
				extra: fmt.Sprintf("max_rate = %g\n", tc.maxRate)})
			d.write(strings.Replace(mustRead(t, d.path), `interval = "1h"`, `interval = "2s"`, 1))
			// Reconnects on the production schedule (1 s doubling to 8 s):
			// with the tests' 100 ms, an unpaced agent comes back before
			// the hub's schedule has moved on, fills its backlog at once
			// and is closed again before anything is taken.
			d.tweak = func(o *agent.Options) { o.Backoff = retry.Policy{Min: time.Second, Max: 5 * time.Minute} }
			spoolReadings(t, d, n, 60)
			r := d.start()
			start := time.Now()
			testenv.Eventually(t, 120*time.Second, "the backlog delivered", func() bool {
				return logLines(az, reg) >= n && len(readings(t, az, reg)) >= n && func() bool { l, _, _ := tally(readings(t, az, reg), n); return l == 0 }()
			})
			took := time.Since(start)
			rs := readings(t, az, reg)
			lost, dups, _ := tally(rs, n)
			losses := strings.Count(r.log.String(), "hub connection lost")
			code, _ := lastDisconnect(t, az, reg)
			var all, health []time.Time
			last := rs[len(rs)-1].at
			for _, rec := range records(t, az, reg) {
				all = append(all, rec.ReceivedAt)
				if rec.Properties.Application["type"] == "health" && rec.ReceivedAt.Before(last) {
					health = append(health, rec.ReceivedAt)
				}
			}
			over := overBudget(all, budget)
			t.Logf("%s: %d readings in %v (%.0f/s), lost %d, sent again %d, connections lost %d, last hub disconnect %d, ahead of %g/s by at most %.0f messages, %d health messages during the drain",
				tc.name, n, took.Round(time.Millisecond), float64(n)/took.Seconds(), lost, dups, losses, code, budget, over, len(health))
			if lost != 0 {
				t.Fatalf("%d readings lost", lost)
			}
			if tc.maxRate == 0 {
				if code != 429002 || losses == 0 {
					t.Fatalf("unpaced, the hub never throttled (last disconnect %d, %d connections lost): the test shows nothing", code, losses)
				}
				return
			}
			if dups != 0 || code != 0 || losses != 0 {
				t.Fatalf("paced: %d readings sent twice, last hub disconnect %d, %d connections lost: want none", dups, code, losses)
			}
			if over > hubRate {
				t.Fatalf("the hub took %.0f messages more than %g/s allows: more than its burst allowance of %d", over, budget, hubRate)
			}
			if drain := last.Sub(all[0]); len(health) < int(drain/(2*time.Second))-2 {
				t.Fatalf("%d health messages arrived during a %v drain with a 2 s interval: a backlog held them back", len(health), drain)
			}
		})
	}
}

func mustRead(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// lastDisconnect is why azsim's hub last closed the device's connection.
func lastDisconnect(t *testing.T, az *azsimtest.Azsim, id string) (int, string) {
	t.Helper()
	var v struct {
		LastDisconnect *struct {
			ErrorCode int
			Reason    string
		}
	}
	az.Admin("GET", "/hub/devices/"+id, nil, &v)
	if v.LastDisconnect == nil {
		return 0, ""
	}
	return v.LastDisconnect.ErrorCode, v.LastDisconnect.Reason
}

// When the rest of the fleet fills the hub's rate, PUBACKs come late
// (traffic shaping): the agent slows down on its own (telemetry-throttled,
// a lower send rate in status), and speeds up to its budget again once
// PUBACKs are quick; the hub never has to throttle it.
func TestAdaptsToShapingE2E(t *testing.T) {
	const n = 8_000
	az := azsimtest.Start(t, azsim.Config{HubTier: "S1", HubD2CRate: 1_000})
	d := newDevice(t, az, devOpts{regID: "gw-shaped", symmetric: true, extra: "max_rate = 500\n"})
	spoolReadings(t, d, n, 60)
	d.start()
	testenv.Eventually(t, 60*time.Second, "the drain under way", func() bool { return logLines(az, "gw-shaped") >= 500 })
	// The fleet: another device sends 6,000 messages at once, 5 s of the
	// hub's rate beyond its burst.
	fleet := az.FactorySession(t, "fleet-1")
	waits := make([]func() error, 0, 6000)
	for i := range 6000 {
		w := fleet.PublishTelemetry([]byte(fmt.Sprintf(`{"fleet":%d}`, i)), nil, nil)
		waits = append(waits, func() error { return w(t.Context()) })
	}
	testenv.Eventually(t, 20*time.Second, "the agent slowed down", func() bool {
		st := d.status()
		_, slowed := st.Conditions[telemetry.CondSendSlowed]
		return slowed && st.SendRate < 500
	})
	slowed := d.status()
	for _, w := range waits {
		w()
	}
	testenv.Eventually(t, 40*time.Second, "back at the budget", func() bool {
		st := d.status()
		_, still := st.Conditions[telemetry.CondSendSlowed]
		return !still && st.SendRate == 500
	})
	testenv.Eventually(t, 60*time.Second, "the backlog delivered", func() bool { return logLines(az, "gw-shaped") >= n })
	lost, dups, _ := tally(readings(t, az, "gw-shaped"), n)
	code, _ := lastDisconnect(t, az, "gw-shaped")
	t.Logf("slowed to %.3g/s: %s", slowed.SendRate, slowed.Conditions[telemetry.CondSendSlowed])
	if lost != 0 || dups != 0 || code != 0 {
		t.Fatalf("lost %d, sent twice %d, last hub disconnect %d: want none", lost, dups, code)
	}
}

// connProxy forwards TCP connections to the hub and notes, on the test's
// clock, when each was accepted: the connection attempts the hub sees.
type connProxy struct {
	ln     net.Listener
	now    func() time.Time
	mu     sync.Mutex
	target string
	at     []time.Time
}

func startConnProxy(t *testing.T, now func() time.Time) *connProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &connProxy{ln: ln, now: now}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			p.at = append(p.at, p.now())
			target := p.target
			p.mu.Unlock()
			go func() {
				defer c.Close()
				up, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{}, 2)
				go func() { io.Copy(up, c); done <- struct{}{} }()
				go func() { io.Copy(c, up); done <- struct{}{} }()
				<-done
			}()
		}
	}()
	return p
}

func (p *connProxy) attempts() []time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]time.Time(nil), p.at...)
}

// The daily quota used up in the middle of a drain, on a fake clock shared
// by the agent and azsim (whose quota clock it drives): nothing is lost;
// hub-quota-exceeded is raised in status with what was seen; while the
// quota is used up the hub sees at most one connection per 10 minutes,
// and one shortly after 00:00 UTC, when the quota resets and the drain
// goes on. The test's day starts at 23:00 UTC yesterday (real time), so
// azsim's server certificates, issued on that clock, are valid in real
// time too.
func TestQuotaExhaustedE2E(t *testing.T) {
	// The day's quota takes about two thirds of the readings; the rest
	// fits in the next day's.
	const n, quota = 600, 400
	start := time.Now().UTC().Truncate(24 * time.Hour).Add(-time.Hour)
	midnight := start.Add(time.Hour)
	ft := testenv.StartFakeTime(t, start)
	px := startConnProxy(t, ft.Now)
	az := azsimtest.Start(t, azsim.Config{Now: ft.Now, HubHostName: px.ln.Addr().String(), HubTier: "S1", HubD2CRate: -1, HubDailyQuota: quota})
	px.mu.Lock()
	px.target = az.Info.Listen.Hub
	px.mu.Unlock()
	d := newDevice(t, az, devOpts{regID: "gw-quota", symmetric: true, extra: "max_rate = 0\n"})
	d.clock = ft
	spoolReadings(t, d, n, 100)
	d.start()
	// The clock moves in small steps until the quota is used up, so that
	// the hour before midnight is still ahead then (and no PUBACK looks
	// late because the clock leapt while it was on its way).
	ft.MaxStep(200 * time.Millisecond)
	horizon := start
	testenv.Eventually(t, 60*time.Second, "hub-quota-exceeded", func() bool {
		horizon = horizon.Add(200 * time.Millisecond)
		ft.AllowUntil(horizon)
		_, ok := d.status().Conditions[telemetry.CondHubQuota]
		return ok
	})
	st := d.status()
	reason := st.Conditions[telemetry.CondHubQuota]
	if !strings.Contains(reason, "right after") || !strings.Contains(reason, "403002") || st.HubQuota == nil || st.HubQuota.NextProbe.IsZero() {
		t.Fatalf("status: condition %q, hubQuota %+v: want what was seen, what it means and the next probe", reason, st.HubQuota)
	}
	exhaustedAt := ft.Now()
	got := len(readings(t, az, "gw-quota"))
	if got >= n {
		t.Fatalf("all %d readings arrived with a quota of %d", got, quota)
	}
	// Let the night pass: the hold comes from the agent's clock, not from
	// the test's patience.
	ft.MaxStep(0)
	ft.AllowUntil(midnight.Add(20 * time.Minute))
	testenv.Eventually(t, 120*time.Second, "the rest after 00:00 UTC", func() bool {
		l, _, _ := tally(readings(t, az, "gw-quota"), n)
		return l == 0
	})
	_, dups, _ := tally(readings(t, az, "gw-quota"), n)
	testenv.Eventually(t, 10*time.Second, "the condition cleared", func() bool {
		_, ok := d.status().Conditions[telemetry.CondHubQuota]
		return !ok
	})
	// The first connection is the one that drained until the quota ran
	// out; every later one came while it was used up, or after 00:00.
	all := px.attempts()
	if len(all) == 0 || !all[0].Before(exhaustedAt) {
		t.Fatalf("connections %v", times(all))
	}
	var during, after []time.Time
	for _, at := range all[1:] {
		if at.Before(midnight) {
			during = append(during, at)
		} else {
			after = append(after, at)
		}
	}
	// A probe that leaves before 00:00 can reach the hub after it: the
	// fake clock moves on to the next timer armed (the agent's midnight
	// probe, minutes ahead) while TLS is on the wire, slow under -race,
	// and azsim's quota clock is that same clock. The hub then takes its
	// message and the drain goes on: it was the probe after 00:00, as the
	// arrival of the first reading after the exhausted day says.
	if len(after) == 0 && len(during) > 0 {
		var next time.Time
		for _, r := range readings(t, az, "gw-quota") {
			if r.at.After(exhaustedAt) && (next.IsZero() || r.at.Before(next)) {
				next = r.at
			}
		}
		if next.Before(midnight) {
			t.Fatalf("a reading arrived at %s, after the quota was used up and before 00:00", next.Format(time.TimeOnly))
		}
		during, after = during[:len(during)-1], during[len(during)-1:]
	}
	t.Logf("exhausted at %s with %d of %d readings in; connections while exhausted: %v; after 00:00: %v; %d sent twice",
		exhaustedAt.Format(time.TimeOnly), got, n, times(during), times(after), dups)
	if len(during) < 4 || len(after) == 0 || after[0].After(midnight.Add(5*time.Minute)) {
		t.Fatalf("want probes every 10 to 15 min through the hour and one within 5 min after 00:00 UTC; got %v, then %v", times(during), times(after))
	}
	// The first refused connection is tried again on the usual reconnect
	// schedule (a link may have failed at that moment); the second refusal
	// holds connections back.
	probes := append(during[1:], after[0])
	for i := 1; i < len(probes); i++ {
		gap := probes[i].Sub(probes[i-1])
		midnightProbe := i == len(probes)-1 && !probes[i].Before(midnight.Add(30*time.Second))
		if gap < 10*time.Minute && !midnightProbe {
			t.Fatalf("connections at %s and %s while the quota was used up: %v apart, want 10 min or more", probes[i-1].Format(time.TimeOnly), probes[i].Format(time.TimeOnly), gap)
		}
	}
}

func times(ts []time.Time) []string {
	var out []string
	for _, t := range ts {
		out = append(out, t.Format(time.TimeOnly))
	}
	return out
}

// 1,000 readings of 100 bytes cost at most 40 quota chunks packed (at most
// 1,000 unpacked), as the hub counts them; each reading arrives once, in
// order, with its properties, and with the id it would have had unpacked.
func TestPackingE2E(t *testing.T) {
	const n = 1000
	az := azsimtest.Start(t, azsim.Config{HubTier: "S1"})
	for _, tc := range []struct {
		name, reg, extra string
		maxChunks        int64
	}{
		{"ok/packed", "gw-pack-on", "pack = true\n", 40},
		{"ok/unpacked", "gw-pack-off", "max_rate = 0\n", n},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t, az, devOpts{regID: tc.reg, symmetric: true, extra: tc.extra})
			run := d.start()
			// The twin and the first health message first: what is
			// measured next is the readings alone.
			testenv.Eventually(t, 30*time.Second, "connected, first health message in", func() bool {
				return len(received(az, tc.reg, "health")) == 1 && d.status().State == "connected"
			})
			time.Sleep(500 * time.Millisecond)
			before := quotaUsed(t, az)
			for i := range n {
				testenv.SpoolPut(t, d.cfg.Telemetry.SpoolDir, fmt.Sprintf("r%05d.json", i), readingBody(i, 100))
			}
			testenv.Eventually(t, 60*time.Second, "all readings", func() bool { return len(readings(t, az, tc.reg)) >= n })
			time.Sleep(200 * time.Millisecond)
			chunks := quotaUsed(t, az) - before
			rs := readings(t, az, tc.reg)
			lost, dups, dupIDs := tally(rs, n)
			t.Logf("%s: %d readings of 100 bytes cost %d quota chunks in %d messages", tc.name, n, chunks, logLines(az, tc.reg)-1)
			if chunks > tc.maxChunks || lost != 0 || dups != 0 || dupIDs != 0 {
				t.Fatalf("%d chunks (want at most %d), %d lost, %d twice, %d ids twice", chunks, tc.maxChunks, lost, dups, dupIDs)
			}
			// In order: as the agent queued them (files that arrive within
			// the same instant may be taken in any order; packing must
			// keep the queue's).
			queued := queueOrder(run.log.String())
			if len(queued) != n {
				t.Fatalf("the log names %d queued spool files, want %d", len(queued), n)
			}
			for i, r := range rs {
				if r.n != queued[i] {
					t.Fatalf("reading %d arrived in place %d, where the agent queued reading %d: out of order", r.n, i, queued[i])
				}
				if r.sys["$.ct"] != "application/json" || r.sys["$.ce"] != "utf-8" || !strings.HasPrefix(r.id, "spool-") {
					t.Fatalf("reading %d arrived with properties %v %v, id %q", i, r.sys, r.app, r.id)
				}
				if tc.maxChunks < n && r.packed < 2 && i < n-40 {
					t.Fatalf("reading %d travelled alone", i)
				}
			}
		})
	}
}

// queueOrder is the readings' numbers in the order the agent's log says it
// queued their spool files (rNNNNN.json).
func queueOrder(log string) []int {
	var out []int
	for _, line := range strings.Split(log, "\n") {
		if _, rest, ok := strings.Cut(line, `msg="spool file queued" file=`); ok {
			name := filepath.Base(strings.Fields(rest)[0])
			if n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(name, "r"), ".json")); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

// quotaUsed is the hub's quota use today, in chunks.
func quotaUsed(t *testing.T, az *azsimtest.Azsim) int64 {
	t.Helper()
	var v struct{ Quota struct{ Used int64 } }
	if st := az.Admin("GET", "/hub/quota", nil, &v); st != 200 {
		t.Fatalf("GET /hub/quota: %d", st)
	}
	return v.Quota.Used
}

// max_rate is reloadable: a drain paced at 5 messages/s speeds up as soon
// as the config says 0, without a restart.
func TestMaxRateReloadE2E(t *testing.T) {
	const n = 300
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-rate-reload", symmetric: true, extra: "max_rate = 5\n"})
	spoolReadings(t, d, n, 60)
	d.start()
	testenv.Eventually(t, 30*time.Second, "the paced drain under way", func() bool { return logLines(az, "gw-rate-reload") >= 10 })
	time.Sleep(2 * time.Second)
	if got := len(readings(t, az, "gw-rate-reload")); got > 5+5*8 {
		t.Fatalf("%d readings within seconds at max_rate = 5", got)
	}
	d.write(strings.Replace(mustRead(t, d.path), "max_rate = 5", "max_rate = 0", 1))
	testenv.Eventually(t, 15*time.Second, "the rest at once after the reload (at 5/s it would take a minute)", func() bool {
		l, _, _ := tally(readings(t, az, "gw-rate-reload"), n)
		return l == 0
	})
}
