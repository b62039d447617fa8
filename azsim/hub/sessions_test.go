package hub_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A persistent session (CleanSession=0) survives a restart of the hub, as
// the real hub's survive its restarts: the device reconnects, does not
// subscribe again (Microsoft's Python SDK does not), and still gets twin
// answers, direct methods and the C2D messages queued or unacknowledged
// while the hub was down.
func TestPersistentSessionSurvivesRestart(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	subs := []string{"$iothub/twin/res/#", "$iothub/methods/POST/#", "devices/dev-1/messages/devicebound/#"}
	c := e.mustDial(d, dialOpts{persistent: true, manualAck: true})
	c.sub(t, subs...)

	// One C2D message received but not acknowledged, two queued offline.
	send := func(body string) {
		t.Helper()
		if st := e.api("POST", "/hub/devices/dev-1/c2d", []byte(body), nil); st != http.StatusAccepted {
			t.Fatalf("C2D %q: %d", body, st)
		}
	}
	send("unacked")
	if m := c.recv(t, "devices/dev-1/messages/devicebound/"); string(m.Payload()) != "unacked" {
		t.Fatalf("got %q", m.Payload())
	}
	e.offline(c, "dev-1")
	send("queued-1")
	send("queued-2")

	e.restart()
	if w := e.hub.Warnings(); len(w) != 0 {
		t.Fatalf("warnings after a clean restart: %q", w)
	}
	var v struct{ C2DQueued int }
	e.api("GET", "/hub/devices/dev-1", nil, &v)
	if v.C2DQueued != 3 {
		t.Fatalf("c2dQueued %d after the restart, want 3", v.C2DQueued)
	}

	c = e.mustDial(d, dialOpts{persistent: true})
	if !c.sessionPresent {
		t.Fatal("CONNACK without session present after the restart")
	}
	for _, want := range []string{"unacked", "queued-1", "queued-2"} {
		if m := c.recv(t, "devices/dev-1/messages/devicebound/"); string(m.Payload()) != want {
			t.Fatalf("got %q, want %q", m.Payload(), want)
		}
	}
	c.pub(t, "$iothub/twin/GET/?$rid=7", 0, nil)
	if m := c.recv(t, "$iothub/twin/res/"); status(m.Topic()) != 200 || topicParam(m.Topic(), "$rid") != "7" {
		t.Fatalf("twin answer %s", m.Topic())
	}
	done := make(chan int, 1)
	go func() {
		var res struct{ Status int }
		e.api("POST", "/hub/devices/dev-1/methods/ping?timeout=10", []byte(`{}`), &res)
		done <- res.Status
	}()
	m := c.recv(t, "$iothub/methods/POST/ping/")
	c.pub(t, "$iothub/methods/res/200/?$rid="+topicParam(m.Topic(), "$rid"), 0, []byte(`{"pong":true}`))
	if st := <-done; st != 200 {
		t.Fatalf("method status %d", st)
	}
	// Acknowledged messages are gone from the kept session.
	eventually(t, "the session file without C2D", func() bool {
		b, _ := os.ReadFile(filepath.Join(e.cfg.StateDir, "sessions.json"))
		return strings.Contains(string(b), `"$iothub/methods/POST/#"`) && !strings.Contains(string(b), `"c2d"`)
	})

	t.Run("ok/unsubscribed filters stay unsubscribed", func(t *testing.T) {
		if tok := c.Unsubscribe("$iothub/methods/POST/#"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatal(tok.Error())
		}
		e.offline(c, "dev-1")
		e.restart()
		c = e.mustDial(d, dialOpts{persistent: true})
		var eb struct{ Error string }
		if st := e.api("POST", "/hub/devices/dev-1/methods/ping?timeout=5", []byte(`{}`), &eb); st != http.StatusNotFound {
			t.Fatalf("method after unsubscribing: %d %s", st, eb.Error)
		}
		c.pub(t, "$iothub/twin/GET/?$rid=8", 0, nil)
		c.recv(t, "$iothub/twin/res/")
	})
	t.Run("ok/a clean session ends the kept one", func(t *testing.T) {
		e.offline(c, "dev-1")
		c = e.mustDial(d, dialOpts{})
		e.offline(c, "dev-1")
		e.restart()
		c = e.mustDial(d, dialOpts{persistent: true})
		if c.sessionPresent {
			t.Fatal("session present after a clean session and a restart")
		}
		c.pub(t, "$iothub/twin/GET/?$rid=9", 0, nil)
		c.none(t, "$iothub/twin/res/", 300*time.Millisecond)
	})
}

// A damaged or inconsistent sessions.json does not stop the hub: what
// cannot be used is dropped, and the warnings say what.
func TestDamagedSessions(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	e.issuedDevice("dev-2")
	c := e.mustDial(d, dialOpts{persistent: true})
	c.sub(t, "$iothub/twin/res/#")
	e.offline(c, "dev-1")
	path := filepath.Join(e.cfg.StateDir, "sessions.json")

	t.Run("ok/garbage: every session dropped, the file kept aside", func(t *testing.T) {
		e.hub.Close()
		if err := os.WriteFile(path, []byte(`{"version":1,"sessions":{"dev-1":`), 0o600); err != nil {
			t.Fatal(err)
		}
		e.restart()
		w := e.hub.Warnings()
		if len(w) != 1 || !strings.Contains(w[0], "sessions.json is damaged") || !strings.Contains(w[0], "must subscribe again") {
			t.Fatalf("warnings %q", w)
		}
		aside, _ := filepath.Glob(path + ".damaged-*")
		if len(aside) != 1 {
			t.Fatalf("damaged file not kept aside: %v", aside)
		}
		c := e.mustDial(d, dialOpts{persistent: true})
		if c.sessionPresent {
			t.Fatal("session present from a damaged file")
		}
		e.offline(c, "dev-1")
	})
	t.Run("ok/bad entries: dropped one by one", func(t *testing.T) {
		e.hub.Close()
		f := map[string]any{"version": 1, "sessions": map[string]any{
			"dev-1":   map[string]any{"subscriptions": map[string]int{"$iothub/twin/res/#": 1}},
			"dev-2":   map[string]any{"subscriptions": map[string]int{"#": 1}},
			"ghost-3": map[string]any{"subscriptions": map[string]int{"$iothub/twin/res/#": 1}},
		}}
		b, _ := json.Marshal(f)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		e.restart()
		w := strings.Join(e.hub.Warnings(), "\n")
		if !strings.Contains(w, `"dev-2": subscription "#"`) || !strings.Contains(w, `"ghost-3": the device is not registered`) || strings.Contains(w, `"dev-1"`) {
			t.Fatalf("warnings %q", w)
		}
		c := e.mustDial(d, dialOpts{persistent: true})
		if !c.sessionPresent {
			t.Fatal("the good session was dropped too")
		}
		c.pub(t, "$iothub/twin/GET/?$rid=1", 0, nil)
		c.recv(t, "$iothub/twin/res/")
	})
}

// Many C2D messages and subscription changes do not corrupt the file under
// concurrency (the race detector watches the snapshots).
func TestSessionsConcurrent(t *testing.T) {
	e := newEnv(t)
	for i := range 3 {
		id := fmt.Sprint("dev-", i)
		c := e.mustDial(e.issuedDevice(id), dialOpts{persistent: true})
		c.sub(t, "devices/"+id+"/messages/devicebound/#")
		go func() {
			for j := range 10 {
				e.api("POST", "/hub/devices/"+id+"/c2d", []byte(fmt.Sprint(j)), nil)
			}
		}()
		for range 10 {
			c.recv(t, "devices/"+id+"/messages/devicebound/")
		}
	}
	b, err := os.ReadFile(filepath.Join(e.cfg.StateDir, "sessions.json"))
	if err != nil || !json.Valid(b) {
		t.Fatalf("sessions.json: %v %s", err, b)
	}
}
