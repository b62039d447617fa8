package hub_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/azsim/faults"
)

func TestTelemetryLog(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	c := e.mustDial(d, dialOpts{})

	c.pub(t, "devices/dev-1/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&%24.cid=c%201&room=k%C3%BCche&flag", 1, []byte(`{ "temp": 21.5 }`))
	c.pub(t, "devices/dev-1/messages/events/", 0, []byte("plain text"))
	c.pub(t, "devices/dev-1/messages/events/a=1", 1, []byte{0xff, 0x00, 0xfe})
	eventually(t, "three telemetry records", func() bool { return len(e.telemetry()) == 3 })

	recs := e.telemetry()
	first := recs[0]
	if first["deviceId"] != "dev-1" || !strings.HasPrefix(first["topic"].(string), "devices/dev-1/messages/events/") {
		t.Fatalf("record header: %v", first)
	}
	props := first["properties"].(map[string]any)
	wantSys := map[string]any{"$.mid": "m-1", "$.ct": "application/json", "$.ce": "utf-8", "$.cid": "c 1"}
	if !reflect.DeepEqual(props["system"], wantSys) {
		t.Errorf("system properties %v, want %v", props["system"], wantSys)
	}
	wantApp := map[string]any{"room": "küche", "flag": nil}
	if !reflect.DeepEqual(props["application"], wantApp) {
		t.Errorf("application properties %v, want %v", props["application"], wantApp)
	}
	if !reflect.DeepEqual(first["body"], map[string]any{"temp": 21.5}) {
		t.Errorf("JSON body %v", first["body"])
	}
	if _, err := time.Parse(time.RFC3339Nano, first["receivedAt"].(string)); err != nil {
		t.Errorf("receivedAt: %v", err)
	}
	if recs[1]["body"] != "plain text" {
		t.Errorf("text body %v", recs[1]["body"])
	}
	if recs[2]["body"] != "/wD+" || recs[2]["bodyEncoding"] != "base64" {
		t.Errorf("binary body %v %v", recs[2]["body"], recs[2]["bodyEncoding"])
	}
}

// TestPropertyBagPlus: the hub decodes property bags per RFC 3986, like
// .NET's Uri.UnescapeDataString: %2B is a plus, %20 a space, and a raw '+'
// (what url.QueryEscape makes of a space) is an MQTT wildcard that no topic
// name may contain: the connection is closed.
func TestPropertyBagPlus(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	raw := e.mustDial(d, dialOpts{})
	raw.Publish("devices/dev-1/messages/events/text=a+b", 1, false, []byte("{}"))
	raw.waitLost(t)

	c := e.mustDial(d, dialOpts{})
	c.pub(t, "devices/dev-1/messages/events/sum=1%2B1&text=a%20b%2Bc%26d%3De%2Ff&%C3%B6l=%E6%9D%B1%E4%BA%AC", 1, []byte("{}"))
	eventually(t, "the record", func() bool { return len(e.telemetry()) == 1 })
	app := e.telemetry()[0]["properties"].(map[string]any)["application"]
	want := map[string]any{"sum": "1+1", "text": "a b+c&d=e/f", "öl": "東京"}
	if n := len(e.telemetry()); n != 1 {
		t.Fatalf("%d records, want only the well-formed one", n)
	}
	if !reflect.DeepEqual(app, want) {
		t.Fatalf("application properties %v, want %v", app, want)
	}
}

func TestWillIsTelemetry(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	c := e.mustDial(d, dialOpts{will: `{"gone":true}`})
	// A PUBACK first: the broker's reader for this client is running. A
	// drop between CONNACK and the reader's start ends the client quietly
	// (mochi's Read returns nil for a client already stopped), Will unsent;
	// CI once caught that window.
	c.pub(t, "devices/dev-1/messages/events/", 1, []byte(`{"alive":true}`))
	e.hub.DropAll() // the connection ends without DISCONNECT
	eventually(t, "the Will in the telemetry log", func() bool {
		for _, r := range e.telemetry() {
			app := r["properties"].(map[string]any)["application"].(map[string]any)
			if app["iothub-MessageType"] == "Will" {
				return reflect.DeepEqual(r["body"], map[string]any{"gone": true})
			}
		}
		return false
	})
}

// TestWillWhereverTheReaderWas: a connection the hub ends while the
// broker's reader sits between two packets ends that reader without an
// error, and the broker then drops the Will. IoT Hub sends it for every
// connection that ends without DISCONNECT, so each of these drops, made
// right after a QoS 0 send while the reader is still busy with it, must
// give its Will exactly once. A clean DISCONNECT gives none, nor does a
// device disabled while connected.
func TestWillWhereverTheReaderWas(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	const rounds = 20
	for i := range rounds {
		c := e.mustDial(d, dialOpts{will: fmt.Sprintf(`{"round":%d}`, i)})
		c.Publish("devices/dev-1/messages/events/", 0, false, []byte(`{"alive":true}`))
		e.hub.DropAll()
		c.waitLost(t)
	}
	clean := e.mustDial(d, dialOpts{will: `{"clean":true}`})
	clean.Disconnect(250)
	// Disabling a device ends its connection; a device that may no longer
	// send telemetry does not send its Will either.
	d2 := e.issuedDevice("dev-2")
	gone := e.mustDial(d2, dialOpts{will: `{"disabled":true}`})
	if st := e.api("POST", "/hub/devices/dev-2/disable", nil, nil); st != http.StatusNoContent {
		t.Fatalf("disable: %d", st)
	}
	gone.waitLost(t)
	wills := func() map[string]int {
		seen := map[string]int{}
		for _, r := range e.telemetry() {
			app := r["properties"].(map[string]any)["application"].(map[string]any)
			if app["iothub-MessageType"] == "Will" {
				b, _ := json.Marshal(r["body"])
				seen[string(b)]++
			}
		}
		return seen
	}
	eventually(t, "a Will for every dropped connection", func() bool { return len(wills()) >= rounds })
	// The clean disconnect's Will would have been logged by now: the
	// DISCONNECT went out after the last drop.
	time.Sleep(200 * time.Millisecond)
	got := wills()
	for i := range rounds {
		if k := fmt.Sprintf(`{"round":%d}`, i); got[k] != 1 {
			t.Errorf("Will of round %d logged %d times, want once", i, got[k])
		}
	}
	if got[`{"clean":true}`] != 0 {
		t.Errorf("a clean DISCONNECT's Will was logged")
	}
	if got[`{"disabled":true}`] != 0 {
		t.Errorf("a disabled device's Will was logged")
	}
}

func TestConnectionClosingPublishes(t *testing.T) {
	e := newEnv(t)
	e.issuedDevice("dev-2")
	tests := []struct {
		name    string
		topic   string
		qos     byte
		payload []byte
	}{
		{"fail/qos2", "devices/dev-1/messages/events/", 2, []byte("x")},
		{"fail/oversize", "devices/dev-1/messages/events/", 1, bytes.Repeat([]byte("x"), 256*1024+1)},
		{"fail/other-device-topic", "devices/dev-2/messages/events/", 1, []byte("x")},
		{"fail/unknown-topic", "some/topic", 1, []byte("x")},
		{"fail/devicebound-topic", "devices/dev-1/messages/devicebound/", 0, []byte("x")},
		{"fail/bad-property-bag", "devices/dev-1/messages/events/a=%zz", 1, []byte("x")},
	}
	d := e.issuedDevice("dev-1")
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := e.mustDial(d, dialOpts{})
			c.Publish(tc.topic, tc.qos, false, tc.payload)
			c.waitLost(t)
		})
	}
	t.Run("ok/exactly-256KiB", func(t *testing.T) {
		c := e.mustDial(d, dialOpts{})
		c.pub(t, "devices/dev-1/messages/events/", 1, bytes.Repeat([]byte("x"), 256*1024))
		c.stillUp(t)
	})
	t.Run("ok/no-trailing-slash", func(t *testing.T) {
		c := e.mustDial(d, dialOpts{})
		c.pub(t, "devices/dev-1/messages/events", 1, []byte("x"))
		c.stillUp(t)
	})
}

func TestSubscriptions(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	c := e.mustDial(d, dialOpts{})
	subscribe := func(filter string, qos byte) byte {
		tok := c.Subscribe(filter, qos, nil)
		if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("subscribe %s: %v", filter, tok.Error())
		}
		return tok.(*paho.SubscribeToken).Result()[filter]
	}
	tests := []struct {
		name   string
		filter string
		qos    byte
		want   byte
	}{
		{"ok/twin-res", "$iothub/twin/res/#", 0, 0},
		{"ok/qos2-granted-1", "$iothub/twin/PATCH/properties/desired/#", 2, 1},
		{"ok/methods", "$iothub/methods/POST/#", 1, 1},
		{"fail/wildcard", "#", 1, 0x80},
		{"fail/other-device-c2d", "devices/dev-2/messages/devicebound/#", 1, 0x80},
		{"fail/undocumented", "$iothub/twin/#", 1, 0x80},
		{"ok/c2d", "devices/dev-1/messages/devicebound/#", 1, 1},
		{"ok/credentials", "$iothub/credentials/res/#", 1, 1},
		{"ok/resubscribe-counts-once", "$iothub/twin/res/#", 1, 1},
		{"fail/sixth-filter", "devices/+/messages/devicebound/#", 1, 0x80},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := subscribe(tc.filter, tc.qos); got != tc.want {
				t.Fatalf("SUBACK %#x, want %#x", got, tc.want)
			}
		})
	}
}

func TestTwin(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	c := e.mustDial(d, dialOpts{})
	c.sub(t, "$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#")

	get := func(rid string) map[string]map[string]any {
		t.Helper()
		c.pub(t, "$iothub/twin/GET/?$rid="+rid, 0, nil)
		m := c.recv(t, "$iothub/twin/res/")
		if status(m.Topic()) != 200 || topicParam(m.Topic(), "$rid") != rid {
			t.Fatalf("GET answer %s %s", m.Topic(), m.Payload())
		}
		var doc map[string]map[string]any
		if err := json.Unmarshal(m.Payload(), &doc); err != nil {
			t.Fatal(err)
		}
		return doc
	}
	patch := func(rid, body string) paho.Message {
		t.Helper()
		c.pub(t, "$iothub/twin/PATCH/properties/reported/?$rid="+rid, 1, []byte(body))
		return c.recv(t, "$iothub/twin/res/")
	}

	t.Run("ok/get-empty", func(t *testing.T) {
		doc := get("1")
		if doc["desired"]["$version"] != 1.0 || doc["reported"]["$version"] != 1.0 || len(doc["reported"]) != 1 {
			t.Fatalf("fresh twin %v", doc)
		}
	})
	t.Run("ok/patch-reported", func(t *testing.T) {
		m := patch("2", `{"fw":"1.0","net":{"ip":"10.0.0.2","mask":"255.0.0.0"},"gone":1}`)
		if status(m.Topic()) != 204 || topicParam(m.Topic(), "$version") != "2" || len(m.Payload()) != 0 {
			t.Fatalf("PATCH answer %s %q", m.Topic(), m.Payload())
		}
		m = patch("3", `{"net":{"mask":null},"gone":null,"big":12345678901234567890}`)
		if topicParam(m.Topic(), "$version") != "3" {
			t.Fatalf("PATCH answer %s", m.Topic())
		}
		var doc struct{ Reported json.RawMessage }
		c.pub(t, "$iothub/twin/GET/?$rid=4", 0, nil)
		_ = json.Unmarshal(c.recv(t, "$iothub/twin/res/200/").Payload(), &doc)
		var rep map[string]any
		dec := json.NewDecoder(bytes.NewReader(doc.Reported))
		dec.UseNumber()
		_ = dec.Decode(&rep)
		want := map[string]any{"fw": "1.0", "net": map[string]any{"ip": "10.0.0.2"}, "big": json.Number("12345678901234567890"), "$version": json.Number("3")}
		if !reflect.DeepEqual(rep, want) {
			t.Fatalf("reported %v, want %v", rep, want)
		}
	})
	for _, tc := range []struct{ name, body string }{
		{"fail/patch-bad-json", `{"a":`},
		{"fail/patch-not-object", `[1,2]`},
		{"fail/patch-dollar-key", `{"$version":5}`},
		{"fail/patch-empty", ``},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := patch("5", tc.body)
			if status(m.Topic()) != 400 {
				t.Fatalf("answer %s, want 400", m.Topic())
			}
			c.stillUp(t)
		})
	}
	t.Run("ok/desired-pushed", func(t *testing.T) {
		var v map[string]int
		if st := e.api("PATCH", "/hub/devices/dev-1/twin/desired", []byte(`{"interval":30,"mode":{"x":1}}`), &v); st != http.StatusOK || v["$version"] != 2 {
			t.Fatalf("desired patch: %d %v", st, v)
		}
		m := c.recv(t, "$iothub/twin/PATCH/properties/desired/")
		if topicParam(m.Topic(), "$version") != "2" {
			t.Fatalf("desired topic %s", m.Topic())
		}
		var body map[string]any
		_ = json.Unmarshal(m.Payload(), &body)
		if !reflect.DeepEqual(body, map[string]any{"interval": 30.0, "mode": map[string]any{"x": 1.0}, "$version": 2.0}) {
			t.Fatalf("desired body %v", body)
		}
		if doc := get("6"); doc["desired"]["interval"] != 30.0 || doc["desired"]["$version"] != 2.0 {
			t.Fatalf("twin after desired patch %v", doc)
		}
		var admin map[string]map[string]any
		e.api("GET", "/hub/devices/dev-1/twin", nil, &admin)
		if admin["reported"]["fw"] != "1.0" || admin["desired"]["$version"] != 2.0 {
			t.Fatalf("admin twin %v", admin)
		}
	})
	t.Run("fail/desired-bad-json", func(t *testing.T) {
		if st := e.api("PATCH", "/hub/devices/dev-1/twin/desired", []byte(`nope`), nil); st != http.StatusBadRequest {
			t.Fatalf("status %d", st)
		}
	})
	t.Run("fail/desired-unknown-device", func(t *testing.T) {
		if st := e.api("PATCH", "/hub/devices/nobody/twin/desired", []byte(`{}`), nil); st != http.StatusNotFound {
			t.Fatalf("status %d", st)
		}
	})
	t.Run("fail/injected-429", func(t *testing.T) {
		e.faults.Arm(faults.Hub, 1, faults.Answer{Status: 429, RetryAfter: 7})
		c.pub(t, "$iothub/twin/GET/?$rid=7", 0, nil)
		m := c.recv(t, "$iothub/twin/res/")
		if status(m.Topic()) != 429 || topicParam(m.Topic(), "retry-after") != "7" || topicParam(m.Topic(), "$rid") != "7" {
			t.Fatalf("answer %s", m.Topic())
		}
		get("8") // the fault was used up
	})
	t.Run("fail/injected-503-on-patch", func(t *testing.T) {
		e.faults.Arm(faults.Hub, 1, faults.Answer{Status: 503})
		if m := patch("9", `{"a":1}`); status(m.Topic()) != 503 {
			t.Fatalf("answer %s", m.Topic())
		}
		if doc := get("10"); doc["reported"]["a"] != nil {
			t.Fatal("the refused patch was applied")
		}
	})
}

func TestDirectMethods(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	c := e.mustDial(d, dialOpts{})

	invoke := func(name, timeout, payload string) (int, map[string]any) {
		var out map[string]any
		st := e.api("POST", "/hub/devices/dev-1/methods/"+name+"?timeout="+timeout, []byte(payload), &out)
		return st, out
	}

	t.Run("fail/not-subscribed", func(t *testing.T) {
		if st, _ := invoke("reboot", "1", `{}`); st != http.StatusNotFound {
			t.Fatalf("status %d, want 404", st)
		}
	})
	c.sub(t, "$iothub/methods/POST/#")
	t.Run("ok/round-trip", func(t *testing.T) {
		done := make(chan struct{})
		go func() {
			defer close(done)
			m := c.recv(t, "$iothub/methods/POST/")
			if !strings.HasPrefix(m.Topic(), "$iothub/methods/POST/reboot/?$rid=") || string(m.Payload()) != `{"delay":5}` {
				t.Errorf("request %s %s", m.Topic(), m.Payload())
			}
			c.Publish("$iothub/methods/res/201/?$rid="+topicParam(m.Topic(), "$rid"), 1, false, `{"ok":true}`)
		}()
		st, out := invoke("reboot", "5", `{"delay":5}`)
		<-done
		if st != http.StatusOK || out["status"] != 201.0 || !reflect.DeepEqual(out["payload"], map[string]any{"ok": true}) {
			t.Fatalf("result %d %v", st, out)
		}
	})
	t.Run("fail/timeout", func(t *testing.T) {
		start := time.Now()
		st, _ := invoke("slow", "0.3", `null`)
		if st != http.StatusGatewayTimeout {
			t.Fatalf("status %d, want 504", st)
		}
		if time.Since(start) < 300*time.Millisecond {
			t.Fatal("returned before the timeout")
		}
		c.recv(t, "$iothub/methods/POST/slow/") // it was sent
	})
	t.Run("fail/payload-not-json", func(t *testing.T) {
		if st, _ := invoke("x", "1", `{nope`); st != http.StatusBadRequest {
			t.Fatalf("status %d", st)
		}
	})
	t.Run("fail/offline", func(t *testing.T) {
		e.offline(c, "dev-1") // wait until the hub saw the disconnect
		if st, _ := invoke("reboot", "1", `{}`); st != http.StatusNotFound {
			t.Fatalf("status %d, want 404", st)
		}
	})
}

func TestC2D(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	send := func(body string, props ...string) (int, map[string]string) {
		q := ""
		for i, p := range props {
			if i == 0 {
				q += "?"
			} else {
				q += "&"
			}
			q += "prop=" + p
		}
		var out map[string]string
		return e.api("POST", "/hub/devices/dev-1/c2d"+q, []byte(body), &out), out
	}

	t.Run("fail/never-connected", func(t *testing.T) {
		if st, _ := send("hi"); st != http.StatusConflict {
			t.Fatalf("status %d, want 409", st)
		}
	})
	t.Run("ok/delivered-live", func(t *testing.T) {
		c := e.mustDial(d, dialOpts{})
		c.sub(t, "devices/dev-1/messages/devicebound/#")
		st, out := send("hello", "color=dark%20red", "flag")
		if st != http.StatusAccepted || out["state"] != "delivered" || out["messageId"] == "" {
			t.Fatalf("send: %d %v", st, out)
		}
		m := c.recv(t, "devices/dev-1/messages/devicebound/")
		bag := strings.TrimPrefix(m.Topic(), "devices/dev-1/messages/devicebound/")
		want := "%24.mid=" + out["messageId"] + "&%24.to=%2Fdevices%2Fdev-1%2Fmessages%2FdeviceBound&color=dark%20red&flag"
		if bag != want || string(m.Payload()) != "hello" || m.Qos() != 1 {
			t.Fatalf("got %s %q qos %d, want bag %s", m.Topic(), m.Payload(), m.Qos(), want)
		}
		// The client's PUBACK completes the message at the hub; going
		// offline before the hub read it would leave it in flight, counted
		// in the later subtests' queue.
		c2dSettled(t, e)
		e.offline(c, "dev-1")
	})
	t.Run("fail/offline-after-clean-session", func(t *testing.T) {
		if st, _ := send("lost"); st != http.StatusConflict {
			t.Fatalf("status %d, want 409", st)
		}
	})
	t.Run("ok/queued-for-persistent-session", func(t *testing.T) {
		e.offline(e.mustDial(d, dialOpts{persistent: true}), "dev-1")
		for i := range 3 {
			if st, out := send(fmt.Sprint("q", i)); st != http.StatusAccepted || out["state"] != "queued" {
				t.Fatalf("send: %d %v", st, out)
			}
		}
		var v struct{ C2DQueued int }
		e.api("GET", "/hub/devices/dev-1", nil, &v)
		if v.C2DQueued != 3 {
			t.Fatalf("c2dQueued %d", v.C2DQueued)
		}
		c := e.mustDial(d, dialOpts{persistent: true})
		c.sub(t, "devices/dev-1/messages/devicebound/#")
		for i := range 3 {
			if m := c.recv(t, "devices/dev-1/messages/devicebound/"); string(m.Payload()) != fmt.Sprint("q", i) {
				t.Fatalf("message %d: %q", i, m.Payload())
			}
		}
		c2dSettled(t, e)
		e.offline(c, "dev-1")
	})
	t.Run("fail/queue-full", func(t *testing.T) {
		// A persistent session keeps its subscription; unsubscribe so
		// messages wait in the hub's queue.
		c := e.mustDial(d, dialOpts{persistent: true})
		if tok := c.Unsubscribe("devices/dev-1/messages/devicebound/#"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatal(tok.Error())
		}
		e.offline(c, "dev-1")
		for i := range 50 {
			if st, _ := send(fmt.Sprint(i)); st != http.StatusAccepted {
				t.Fatalf("send %d: %d", i, st)
			}
		}
		if st, _ := send("51st"); st != http.StatusForbidden {
			t.Fatalf("status %d, want 403", st)
		}
	})
	t.Run("ok/clean-session-drops-queue", func(t *testing.T) {
		e.offline(e.mustDial(d, dialOpts{}), "dev-1")
		var v struct{ C2DQueued int }
		e.api("GET", "/hub/devices/dev-1", nil, &v)
		if v.C2DQueued != 0 {
			t.Fatalf("c2dQueued %d after a clean session", v.C2DQueued)
		}
	})
	t.Run("fail/too-big", func(t *testing.T) {
		e.mustDial(d, dialOpts{})
		if st, _ := send(strings.Repeat("x", 64*1024+1)); st != http.StatusBadRequest {
			t.Fatalf("status %d, want 400", st)
		}
	})
}

// c2dSettled waits until dev-1 has no cloud-to-device message queued or in
// flight: every PUBACK the test client sent has reached the hub.
func c2dSettled(t *testing.T, e *env) {
	t.Helper()
	eventually(t, "the hub got the PUBACKs", func() bool {
		var v struct{ C2DQueued int }
		e.api("GET", "/hub/devices/dev-1", nil, &v)
		return v.C2DQueued == 0
	})
}

// TestConcurrentDevices runs several devices at once, for the race detector.
func TestConcurrentDevices(t *testing.T) {
	e := newEnv(t)
	var wg sync.WaitGroup
	for i := range 4 {
		d := e.issuedDevice(fmt.Sprint("par-", i))
		c := e.mustDial(d, dialOpts{})
		c.sub(t, "$iothub/twin/res/#")
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 10 {
				c.Publish(fmt.Sprintf("devices/%s/messages/events/n=%d", d.id, j), 1, false, "{}").Wait()
				c.Publish(fmt.Sprintf("$iothub/twin/PATCH/properties/reported/?$rid=%d", j), 1, false, fmt.Sprintf(`{"n":%d}`, j)).Wait()
			}
		}()
	}
	wg.Wait()
	eventually(t, "40 telemetry records", func() bool { return len(e.telemetry()) == 40 })
	for i := range 4 {
		var tw map[string]map[string]any
		eventually(t, "reported version 11", func() bool {
			e.api("GET", fmt.Sprint("/hub/devices/par-", i, "/twin"), nil, &tw)
			return tw["reported"]["$version"] == 11.0
		})
	}
}
