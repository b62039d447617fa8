package hub_test

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/azsim/hub"
)

// The figures per tier are Learn's ("IoT Hub quotas and throttling",
// "Choose the right IoT Hub tier and size").
func TestTierLimits(t *testing.T) {
	for _, tc := range []struct {
		tier      string
		units     int
		d2c, conn int
		twin      int
		quota     int64
		chunk     int
	}{
		{"S1", 1, 100, 100, 50, 400_000, 4096},
		{"s1", 9, 108, 108, 50, 3_600_000, 4096},
		{"B1", 2, 100, 100, 50, 800_000, 4096},
		{"F1", 1, 100, 100, 50, 8_000, 512},
		{"S2", 2, 240, 240, 50, 12_000_000, 4096},
		{"S2", 20, 2400, 2400, 100, 120_000_000, 4096},
		{"B3", 1, 6000, 6000, 250, 300_000_000, 4096},
		{"S3", 10, 60000, 60000, 2500, 3_000_000_000, 4096},
	} {
		t.Run(fmt.Sprintf("ok/%s×%d", tc.tier, tc.units), func(t *testing.T) {
			l, err := hub.TierLimits(tc.tier, tc.units)
			if err != nil {
				t.Fatal(err)
			}
			if l.D2CRate != tc.d2c || l.ConnectRate != tc.conn || l.TwinRate != tc.twin || l.DailyQuota != tc.quota || l.ChunkBytes != tc.chunk {
				t.Fatalf("%+v", l)
			}
		})
	}
	for _, tc := range []struct {
		tier  string
		units int
		want  string
	}{
		{"S4", 1, "not one of"},
		{"F1", 2, "1 to 1 units"},
		{"S3", 11, "1 to 10 units"},
		{"S1", 201, "1 to 200 units"},
		{"S1", 0, "1 to 200 units"},
	} {
		t.Run(fmt.Sprintf("fail/%s×%d", tc.tier, tc.units), func(t *testing.T) {
			if _, err := hub.TierLimits(tc.tier, tc.units); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want one about %q", err, tc.want)
			}
		})
	}
}

// acks publishes n QoS 1 telemetry messages at once and reports, in
// order, when each PUBACK came (zero: none, the connection ended).
func acks(t *testing.T, c *client, id string, n int) []time.Duration {
	t.Helper()
	start := time.Now()
	toks := make([]paho.Token, n)
	for i := range toks {
		toks[i] = c.Publish(fmt.Sprintf("devices/%s/messages/events/n=%d", id, i), 1, false, fmt.Sprintf(`{"n":%d}`, i))
	}
	out := make([]time.Duration, n)
	for i, tok := range toks {
		if !tok.WaitTimeout(30 * time.Second) {
			t.Fatalf("message %d: neither PUBACK nor connection loss within 30 s", i)
		}
		if tok.Error() == nil {
			out[i] = time.Since(start)
		}
	}
	return out
}

func acked(d []time.Duration) int {
	n := 0
	for _, x := range d {
		if x > 0 {
			n++
		}
	}
	return n
}

// lastDisconnect is the device's lastDisconnect in the admin API.
func (e *env) lastDisconnect(id string) (code int, reason string) {
	e.t.Helper()
	var v struct {
		LastDisconnect *struct {
			ErrorCode int
			Reason    string
		}
	}
	e.api("GET", "/hub/devices/"+id, nil, &v)
	if v.LastDisconnect == nil {
		return 0, ""
	}
	return v.LastDisconnect.ErrorCode, v.LastDisconnect.Reason
}

// The device-to-cloud throttle shapes as Learn describes: a burst within
// the allowance is taken at once, sustained excess is held (late PUBACKs,
// at the rate), and once a message would be held longer than the backlog
// the hub closes the connection without a PUBACK (429002). Only messages
// that got their PUBACK reach the telemetry log. A rate of 10/s keeps the
// figures far apart on a loaded machine.
func TestD2CThrottle(t *testing.T) {
	for _, ws := range []bool{false, true} {
		name := "mqtt"
		if ws {
			name = "websockets"
		}
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, func(c *hub.Config) {
				c.D2CRate, c.D2CBurst, c.D2CBacklog = 10, 20, 3*time.Second
				c.WSAddr = "127.0.0.1:0"
			})
			d := e.issuedDevice("dev-1")
			c := e.mustDial(d, dialOpts{ws: ws})

			// 21 messages at once: the burst allowance (20) plus the one
			// the rate allows now. At 10/s alone they would take 2 s.
			got := acks(t, c, "dev-1", 21)
			if acked(got) != 21 || got[20] > time.Second {
				t.Fatalf("a burst within the allowance: PUBACKs after %v, want all 21 at once", got)
			}
			time.Sleep(2200 * time.Millisecond) // the allowance fills up again at the rate

			// 40 at once: 21 taken, 19 held and acknowledged at 10/s.
			got = acks(t, c, "dev-1", 40)
			if acked(got) != 40 {
				t.Fatalf("sustained excess within the backlog: %d of 40 acknowledged", acked(got))
			}
			if got[39] < 1700*time.Millisecond {
				t.Fatalf("the 40th PUBACK came after %v; held messages go at 10/s, so not before 1.8 s", got[39])
			}
			for i := 1; i < 40; i++ {
				if got[i] < got[i-1] {
					t.Fatalf("PUBACKs out of order: %v", got)
				}
			}
			c.stillUp(t)
			time.Sleep(4200 * time.Millisecond)

			// 70 at once: 21 taken, held ones wait 100 ms more each, and
			// the one that would wait more than 3 s closes the connection.
			got = acks(t, c, "dev-1", 70)
			c.waitLost(t)
			if code, reason := e.lastDisconnect("dev-1"); code != 429002 || !strings.Contains(reason, "ThrottleBacklogLimitExceeded") {
				t.Fatalf("lastDisconnect %d %q, want 429002 ThrottleBacklogLimitExceeded", code, reason)
			}
			// The hub took the first 21 and then the held ones until the
			// 52nd closed the connection; the ones still held then never
			// reached it. PUBACKs written just before the close can still
			// be lost with the connection (the closing socket has unread
			// data, so TCP resets it): the device must treat every message
			// without a PUBACK as not received.
			log := e.telemetry()
			if len(log) < 61+21 || len(log) > 61+51 {
				t.Fatalf("telemetry log has %d messages of the third batch, want 21 to 51", len(log)-61)
			}
			for i, r := range log[61:] {
				if n := r["properties"].(map[string]any)["application"].(map[string]any)["n"]; n != fmt.Sprint(i) {
					t.Fatalf("third batch message %d in the log is n=%v: the hub took messages out of order or past the refusal", i, n)
				}
			}
			if n := acked(got); n > len(log)-61 {
				t.Fatalf("%d PUBACKs for %d messages taken", n, len(log)-61)
			}
		})
	}
}

// quotaView is GET /hub/quota's quota part.
type quotaView struct {
	Enabled, Exhausted bool
	Limit, Used        int64
	ChunkBytes         int
	Day                string
	Clock, ResetsAt    time.Time
}

func (e *env) quota() quotaView {
	e.t.Helper()
	var v struct{ Quota quotaView }
	if st := e.api("GET", "/hub/quota", nil, &v); st != http.StatusOK {
		e.t.Fatalf("GET /hub/quota: %d", st)
	}
	return v.Quota
}

func (e *env) setUsed(n int64) {
	e.t.Helper()
	if st := e.api("PUT", "/hub/quota", []byte(fmt.Sprintf(`{"used":%d}`, n)), nil); st != http.StatusOK {
		e.t.Fatalf("PUT /hub/quota: %d", st)
	}
}

func (e *env) quotaClock(body string) {
	e.t.Helper()
	if st := e.api("POST", "/hub/quota/clock", []byte(body), nil); st != http.StatusOK {
		e.t.Fatalf("POST /hub/quota/clock %s: %d", body, st)
	}
}

// The daily quota counts messages in 4 KB chunks (0.5 KB on Free) of body
// plus property sizes, as Learn's billing page meters them.
func TestQuotaChunks(t *testing.T) {
	for _, tc := range []struct {
		name  string
		chunk int
		topic string
		body  int
		want  int64
	}{
		{"ok/100 bytes cost 1", 0, "", 100, 1},
		{"ok/4096 bytes cost 1", 0, "", 4096, 1},
		{"ok/4097 bytes cost 2", 0, "", 4097, 2},
		{"ok/10 KB cost 3", 0, "", 10 * 1024, 3},
		{"ok/properties count: 4080+16 bytes cost 1", 0, "%24.ct=application%2Fjson", 4080, 1},
		{"ok/properties count: 4081+16 bytes cost 2", 0, "%24.ct=application%2Fjson", 4081, 2},
		{"ok/application property names count: 4090+3+3 cost 1", 0, "abc=def", 4090, 1},
		{"ok/application property names count: 4091+3+3 cost 2", 0, "abc=def", 4091, 2},
		{"ok/F1: 10 KB cost 20", 512, "", 10 * 1024, 20},
		{"ok/F1: 512 bytes cost 1", 512, "", 512, 1},
		{"ok/empty message costs 1", 0, "", 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(c *hub.Config) { c.DailyQuota, c.QuotaChunk = 1000, tc.chunk })
			c := e.mustDial(e.issuedDevice("dev-1"), dialOpts{})
			c.pub(t, "devices/dev-1/messages/events/"+tc.topic, 1, bytes.Repeat([]byte("x"), tc.body))
			if q := e.quota(); q.Used != tc.want {
				t.Fatalf("used %d, want %d", q.Used, tc.want)
			}
		})
	}
}

// Once the quota is used up the hub takes no telemetry and no twin
// request: it closes the connection without a PUBACK or an answer. A
// reconnect is accepted (CONNACK 0, subscriptions granted) and fails the
// same way at its first publish. The cloud side gets 403002. At 00:00 UTC
// by the quota clock everything works again.
func TestQuotaExceeded(t *testing.T) {
	for _, ws := range []bool{false, true} {
		name := "mqtt"
		if ws {
			name = "websockets"
		}
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, func(c *hub.Config) {
				c.DailyQuota = 5
				c.WSAddr = "127.0.0.1:0"
			})
			d := e.issuedDevice("dev-1")
			// Near the end of a UTC day by the quota clock.
			e.quotaClock(`{"set":"2025-03-01T23:58:00Z"}`)
			c := e.mustDial(d, dialOpts{ws: ws, persistent: true})
			c.sub(t, "$iothub/twin/res/#", "$iothub/methods/POST/#", "devices/dev-1/messages/devicebound/#")
			for i := range 5 {
				c.pub(t, "devices/dev-1/messages/events/", 1, []byte(fmt.Sprint(i)))
			}
			if q := e.quota(); q.Used != 5 || !q.Exhausted || q.Day != "2025-03-01" || !q.ResetsAt.Equal(time.Date(2025, 3, 2, 0, 0, 0, 0, time.UTC)) {
				t.Fatalf("quota %+v, want 5 of 5 used on 2025-03-01, reset at 2025-03-02T00:00:00Z", q)
			}

			// Telemetry over quota: no PUBACK, the connection closes.
			tok := c.Publish("devices/dev-1/messages/events/", 1, false, "over")
			c.waitLost(t)
			if tok.WaitTimeout(5*time.Second) && tok.Error() == nil {
				t.Fatal("a message over quota got a PUBACK")
			}
			if code, reason := e.lastDisconnect("dev-1"); code != 403002 || !strings.Contains(reason, "IoTHubQuotaExceeded") {
				t.Fatalf("lastDisconnect %d %q, want 403002", code, reason)
			}
			if n := len(e.telemetry()); n != 5 {
				t.Fatalf("telemetry log has %d messages, want the 5 within quota", n)
			}

			// The cloud side is refused with 403002.
			var eb struct{ Error string }
			if st := e.api("POST", "/hub/devices/dev-1/c2d", []byte("hi"), &eb); st != http.StatusForbidden || !strings.Contains(eb.Error, "403002") {
				t.Fatalf("C2D over quota: %d %s", st, eb.Error)
			}
			if st := e.api("POST", "/hub/devices/dev-1/methods/ping?timeout=5", []byte("{}"), &eb); st != http.StatusForbidden || !strings.Contains(eb.Error, "403002") {
				t.Fatalf("method over quota: %d %s", st, eb.Error)
			}

			// A reconnect is accepted, subscriptions too; a twin request
			// closes it without an answer.
			c = e.mustDial(d, dialOpts{ws: ws, persistent: true})
			c.sub(t, "$iothub/twin/res/#")
			c.pub(t, "$iothub/twin/GET/?$rid=1", 0, nil)
			c.waitLost(t)
			c.none(t, "$iothub/twin/res/", 300*time.Millisecond)
			// ... and so does telemetry, again.
			c = e.mustDial(d, dialOpts{ws: ws, persistent: true})
			c.Publish("devices/dev-1/messages/events/", 1, false, "over again")
			c.waitLost(t)

			// Past midnight UTC by the quota clock the count starts anew.
			e.quotaClock(`{"advance":"2m"}`)
			if q := e.quota(); q.Used != 0 || q.Exhausted || q.Day != "2025-03-02" {
				t.Fatalf("after midnight: %+v", q)
			}
			c = e.mustDial(d, dialOpts{ws: ws, persistent: true})
			c.pub(t, "devices/dev-1/messages/events/", 1, []byte("new day"))
			c.pub(t, "$iothub/twin/GET/?$rid=2", 0, nil)
			if m := c.recv(t, "$iothub/twin/res/"); status(m.Topic()) != 200 {
				t.Fatalf("twin GET after the reset: %s", m.Topic())
			}
			if q := e.quota(); q.Used != 2 {
				t.Fatalf("used %d after a message and a twin read, want 2", q.Used)
			}
		})
	}
}

// The reset happens as the quota clock passes 00:00 UTC by itself, and
// the day's use and the clock survive a restart of the hub.
func TestQuotaClockAndRestart(t *testing.T) {
	e := newEnv(t, func(c *hub.Config) { c.DailyQuota = 3 })
	e.quotaClock(`{"set":"2025-06-30T23:59:57Z"}`)
	e.setUsed(3)
	if q := e.quota(); !q.Exhausted {
		t.Fatalf("%+v", q)
	}
	e.restart()
	if q := e.quota(); q.Used != 3 || q.Day != "2025-06-30" {
		t.Fatalf("after a restart: %+v, want the day's use kept", q)
	}
	eventually(t, "the quota reset at 00:00 UTC", func() bool { q := e.quota(); return q.Day == "2025-07-01" && q.Used == 0 })
	e.quotaClock(`{"reset":true}`)
	if q := e.quota(); time.Since(q.Clock).Abs() > time.Minute {
		t.Fatalf("after reset the quota clock reads %v", q.Clock)
	}

	t.Run("ok/damaged quota.json does not stop the hub", func(t *testing.T) {
		e.hub.Close()
		if err := os.WriteFile(filepath.Join(e.cfg.StateDir, "quota.json"), []byte("{not json"), 0o600); err != nil {
			t.Fatal(err)
		}
		e.restart()
		if w := e.hub.Warnings(); len(w) != 1 || !strings.Contains(w[0], "quota.json is damaged") || !strings.Contains(w[0], "starts again from 0") {
			t.Fatalf("warnings %q", w)
		}
		if q := e.quota(); q.Used != 0 || !q.Enabled {
			t.Fatalf("%+v", q)
		}
	})
	t.Run("fail/bad admin requests", func(t *testing.T) {
		for _, body := range []string{`{}`, `{"set":"tomorrow"}`, `{"advance":"soon"}`, `{"set":"2025-01-01T00:00:00Z","advance":"1h"}`} {
			if st := e.api("POST", "/hub/quota/clock", []byte(body), nil); st != http.StatusBadRequest {
				t.Errorf("%s: %d, want 400", body, st)
			}
		}
		for _, body := range []string{`{}`, `{"used":-1}`, `{"used":"x"}`} {
			if st := e.api("PUT", "/hub/quota", []byte(body), nil); st != http.StatusBadRequest {
				t.Errorf("%s: %d, want 400", body, st)
			}
		}
	})
}

// Without a quota (the library's default) the quota API says so.
func TestNoQuota(t *testing.T) {
	e := newEnv(t)
	if q := e.quota(); q.Enabled {
		t.Fatalf("%+v", q)
	}
	if st := e.api("PUT", "/hub/quota", []byte(`{"used":1}`), nil); st != http.StatusConflict {
		t.Fatalf("status %d, want 409", st)
	}
}
