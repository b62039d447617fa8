package hub

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/azsim/broker"
	mqtt "github.com/mochi-mqtt/server/v2"
)

const (
	maxMethodPayload = 128 * 1024
	maxC2DPayload    = 64 * 1024
	maxC2DQueue      = 50
	maxMethodTimeout = 300 * time.Second
)

type methodKey struct{ deviceID, rid string }

type methodResult struct {
	status  int
	payload []byte
}

// MethodResult is a direct method's answer as the admin API returns it.
type MethodResult struct {
	Status  int             `json:"status"`
	Payload json.RawMessage `json:"payload"`
}

// invokeMethod sends a direct method request to the device and waits for
// its answer.
func (h *Hub) invokeMethod(ctx context.Context, id, name string, payload []byte, timeout time.Duration) (MethodResult, error) {
	if name == "" || len(name) > 128 || strings.ContainsAny(name, "/#+?") {
		return MethodResult{}, errorf(http.StatusBadRequest, "method name %q must be 1 to 128 characters without / # + ?", name)
	}
	if len(payload) == 0 {
		payload = []byte("null")
	}
	if !json.Valid(payload) {
		return MethodResult{}, errorf(http.StatusBadRequest, "method payload is not JSON; send a JSON value (e.g. {} or \"text\")")
	}
	if len(payload) > maxMethodPayload {
		return MethodResult{}, errorf(http.StatusBadRequest, "method payload is %d bytes; the limit is 128 KiB", len(payload))
	}
	if timeout <= 0 || timeout > maxMethodTimeout {
		return MethodResult{}, errorf(http.StatusBadRequest, "timeout %v must be more than 0 and at most 300 seconds", timeout)
	}
	if h.quota.exhausted() {
		return MethodResult{}, h.quota.errExhausted()
	}
	h.mu.Lock()
	if _, ok := h.devices[id]; !ok {
		h.mu.Unlock()
		return MethodResult{}, errNoDevice(id)
	}
	cl, _ := h.liveClientLocked(id)
	if cl == nil {
		h.mu.Unlock()
		return MethodResult{}, errorf(http.StatusNotFound, "device %q is not connected (404103 DeviceNotOnline); start the device and retry", id)
	}
	if ok, _ := subscribed(cl, subMethods); !ok {
		h.mu.Unlock()
		return MethodResult{}, errorf(http.StatusNotFound, "device %q has not subscribed to $iothub/methods/POST/# (404103 DeviceNotOnline); the device must subscribe before it can receive methods", id)
	}
	h.nextRID++
	rid := strconv.FormatUint(h.nextRID, 10)
	key := methodKey{id, rid}
	ch := make(chan methodResult, 1)
	h.methods[key] = ch
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.methods, key)
		h.mu.Unlock()
	}()

	// The hub sends method requests at QoS 0. Request and response are
	// metered as messages each.
	h.quota.charge(len(payload))
	if err := h.send(cl, "$iothub/methods/POST/"+name+"/?$rid="+rid, payload, 0); err != nil {
		return MethodResult{}, errorf(http.StatusNotFound, "device %q went away before the method could be sent; retry when it is connected", id)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-ch:
		h.quota.charge(len(r.payload))
		out := MethodResult{Status: r.status, Payload: json.RawMessage("null")}
		if len(r.payload) > 0 {
			if json.Valid(r.payload) {
				out.Payload = r.payload
			} else {
				b, _ := json.Marshal(string(r.payload))
				out.Payload = b
			}
		}
		return out, nil
	case <-t.C:
		return MethodResult{}, errorf(http.StatusGatewayTimeout, "device %q did not answer method %q within %v (504101 GatewayTimeout); check that the device handles it, or raise ?timeout=", id, name, timeout)
	case <-ctx.Done():
		return MethodResult{}, errorf(http.StatusGatewayTimeout, "method %q on %q abandoned: %v", name, id, ctx.Err())
	case <-h.ctx.Done():
		return MethodResult{}, errorf(http.StatusServiceUnavailable, "azsim is shutting down")
	}
}

func (h *Hub) methodResponse(cl *mqtt.Client, t deviceTopic, payload []byte) {
	if !t.hasRID {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	key := methodKey{cl.ID, t.rid}
	if ch, ok := h.methods[key]; ok {
		delete(h.methods, key)
		ch <- methodResult{status: t.status, payload: append([]byte(nil), payload...)}
	}
}

type c2dMessage struct {
	topic   string
	payload []byte
}

// C2DResult says what became of a cloud-to-device message.
type C2DResult struct {
	MessageID string `json:"messageId"`
	// State is "delivered" (sent to the connected, subscribed device) or
	// "queued" (waiting for the device to subscribe).
	State string `json:"state"`
}

// sendC2D queues a cloud-to-device message. The hub keeps a queue only for
// a device that is connected or whose last session was persistent
// (CleanSession=0); for anything else the message would be lost, and the
// admin is told so instead.
func (h *Hub) sendC2D(id string, body []byte, props []property) (C2DResult, error) {
	if len(body) > maxC2DPayload {
		return C2DResult{}, errorf(http.StatusBadRequest, "message is %d bytes; C2D messages are limited to 64 KiB", len(body))
	}
	var bag []property
	mid := ""
	for _, p := range props {
		if p.key == "$.mid" && p.value != nil {
			mid = *p.value
		}
	}
	if mid == "" {
		mid = newUUID()
		bag = append(bag, property{key: "$.mid", value: &mid})
	}
	to := "/devices/" + id + "/messages/deviceBound"
	bag = append(bag, property{key: "$.to", value: &to})
	bag = append(bag, props...)
	msg := c2dMessage{
		topic:   "devices/" + id + "/messages/devicebound/" + encodeBag(bag),
		payload: append([]byte(nil), body...),
	}

	h.mu.Lock()
	d, ok := h.devices[id]
	if !ok {
		h.mu.Unlock()
		return C2DResult{}, errNoDevice(id)
	}
	cl, _ := h.liveClientLocked(id)
	if cl == nil && !d.persistentSession {
		h.mu.Unlock()
		return C2DResult{}, errorf(http.StatusConflict, "device %q is offline and its last MQTT session was clean (CleanSession=1), so the hub keeps no queue for it and the message would be lost; connect the device with CleanSession=0, or send while it is connected", id)
	}
	if len(d.c2d)+len(d.c2dInflight) >= maxC2DQueue {
		h.mu.Unlock()
		return C2DResult{}, errorf(http.StatusForbidden, "device %q already has %d C2D messages waiting (403004 DeviceMaximumQueueDepthExceeded); let the device connect and receive them first", id, maxC2DQueue)
	}
	if h.quota.exhausted() {
		h.mu.Unlock()
		return C2DResult{}, h.quota.errExhausted()
	}
	d.c2d = append(d.c2d, msg)
	persistent := d.persistentSession
	h.mu.Unlock()
	h.quota.charge(messageSize(bag, body))
	res := C2DResult{MessageID: mid, State: "queued"}
	if cl != nil && h.flush(cl) {
		res.State = "delivered"
	} else if persistent {
		_ = h.saveSessions()
	}
	return res, nil
}

// flush delivers what waits for a device whose subscriptions now allow it:
// queued C2D messages and a finished certificate renewal. It reports whether
// C2D messages were sent.
func (h *Hub) flush(cl *mqtt.Client) bool {
	sent := false
	if ok, qos := subscribed(cl, subC2D); ok {
		h.mu.Lock()
		var msgs []c2dMessage
		if d, ok := h.devices[cl.ID]; ok {
			msgs, d.c2d = d.c2d, nil
		}
		h.mu.Unlock()
		for i, m := range msgs {
			// A QoS 1 message is kept until its PUBACK (c2dAcked), so that
			// an azsim restart does not lose it; recorded before it is
			// written, as the PUBACK may be handled before Send returns.
			id, err := broker.SendTracked(cl, m.topic, m.payload, qos, func(id uint16) {
				h.mu.Lock()
				if d, ok := h.devices[cl.ID]; ok {
					d.c2dInflight = append(d.c2dInflight, inflightC2D{packetID: id, msg: m})
				}
				h.mu.Unlock()
			})
			h.mu.Lock()
			if d, ok := h.devices[cl.ID]; ok && err != nil {
				// Put back what did not go out, ahead of newer messages.
				d.c2dInflight = slices.DeleteFunc(d.c2dInflight, func(f inflightC2D) bool { return qos == 1 && f.packetID == id })
				d.c2d = append(append([]c2dMessage(nil), msgs[i:]...), d.c2d...)
			}
			h.mu.Unlock()
			if err != nil {
				break
			}
			sent = true
		}
		if sent {
			_ = h.saveSessions()
		}
	}
	h.deliverRenewal(cl.ID)
	return sent
}

// c2dAcked: the device acknowledged the QoS 1 message with this packet id.
func (h *Hub) c2dAcked(deviceID string, packetID uint16) {
	h.mu.Lock()
	d, ok := h.devices[deviceID]
	found := false
	if ok {
		for i, m := range d.c2dInflight {
			if m.packetID == packetID {
				d.c2dInflight = append(d.c2dInflight[:i:i], d.c2dInflight[i+1:]...)
				found = true
				break
			}
		}
	}
	persistent := ok && d.persistentSession
	h.mu.Unlock()
	if found && persistent {
		_ = h.saveSessions()
	}
}

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	s := hex.EncodeToString(b[:])
	return s[0:8] + "-" + s[8:12] + "-" + s[12:16] + "-" + s[16:20] + "-" + s[20:32]
}
