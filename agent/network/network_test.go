package network

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/mqttconn"
)

// The auto policy over a sequence of connections: what is tried first, what
// is remembered, when 8883 gets another chance. A fake clock; the state
// directory is real.
func TestAutoMemory(t *testing.T) {
	cfg, dir := Config{Transport: "auto"}, t.TempDir()
	cfg.Defaults()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	step := func(now time.Time, used mqttconn.Transport) (prefer mqttconn.Transport, probe bool) {
		t.Helper()
		c, err := Choose(cfg, dir, now, 443)
		if err != nil {
			t.Fatal(err)
		}
		if err := remember(cfg, dir, now, used, c.probe); err != nil {
			t.Fatal(err)
		}
		return c.Options.Prefer, c.probe
	}
	if p, probe := step(t0, mqttconn.WebSocket); p != mqttconn.MQTT || probe {
		t.Fatalf("first connection tries %s (probe %v), want mqtt", p, probe)
	}
	if p, probe := step(t0.Add(time.Hour), mqttconn.WebSocket); p != mqttconn.WebSocket || probe {
		t.Fatalf("after websocket worked, tries %s (probe %v)", p, probe)
	}
	// 6 h after WebSockets first worked, 8883 is tried first again; it is
	// still blocked, so the clock for the next probe restarts.
	if p, probe := step(t0.Add(6*time.Hour), mqttconn.WebSocket); p != mqttconn.MQTT || !probe {
		t.Fatalf("re-probe: tries %s (probe %v)", p, probe)
	}
	if p, probe := step(t0.Add(7*time.Hour), mqttconn.WebSocket); p != mqttconn.WebSocket || probe {
		t.Fatalf("right after a failed probe: tries %s (probe %v)", p, probe)
	}
	// The firewall opened 8883: the next probe succeeds and MQTT is the
	// default again, with nothing left on disk.
	if p, _ := step(t0.Add(13*time.Hour), mqttconn.MQTT); p != mqttconn.MQTT {
		t.Fatalf("second probe tries %s", p)
	}
	if m := readMemory(dir); m.Transport != mqttconn.MQTT {
		t.Fatalf("memory %+v after MQTT worked", m)
	}
	// A damaged, huge or special memory file means nothing learnt.
	for _, bad := range []func(string) error{
		func(p string) error { return os.WriteFile(p, []byte(`{"transport":`), 0o600) },
		func(p string) error {
			return os.WriteFile(p, []byte(`{"transport":"websocket","x":"`+strings.Repeat("a", 2<<20)+`"}`), 0o600)
		},
		func(p string) error { return syscall.Mkfifo(p, 0o600) },
	} {
		os.Remove(memoryPath(dir))
		if err := bad(memoryPath(dir)); err != nil {
			t.Fatal(err)
		}
		if m := readMemory(dir); m.Transport != mqttconn.MQTT {
			t.Fatalf("bad memory file read as %+v", m)
		}
	}
	// The board rebooted without RTC and NTP is not there yet: the clock is
	// back in 1970, years before the recorded probe. 8883 is tried now,
	// not once the clock has caught up.
	if err := writeMemory(dir, memory{Transport: mqttconn.WebSocket, ProbedAt: t0}); err != nil {
		t.Fatal(err)
	}
	if p, probe := step(time.Unix(60, 0), mqttconn.WebSocket); p != mqttconn.MQTT || !probe {
		t.Fatalf("clock behind the recorded probe: tries %s (probe %v)", p, probe)
	}
	os.Remove(memoryPath(dir))
	// Fixed transports neither read nor write the memory.
	cfg.Transport = "mqtt"
	if p, _ := step(t0, mqttconn.MQTT); p != mqttconn.MQTT {
		t.Fatal(p)
	}
}
