package hub

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/gwagent/gwagent/azsim/broker"
	"github.com/gwagent/gwagent/azsim/faults"
)

const (
	maxTwinSection = 32 * 1024 // desired and reported, each
	maxTwinDepth   = 10
)

// twin is a device twin's desired and reported sections with versions.
type twin struct {
	Desired         map[string]any `json:"desired"`
	DesiredVersion  int64          `json:"desiredVersion"`
	Reported        map[string]any `json:"reported"`
	ReportedVersion int64          `json:"reportedVersion"`
}

func newTwin() twin {
	return twin{Desired: map[string]any{}, DesiredVersion: 1, Reported: map[string]any{}, ReportedVersion: 1}
}

func (t *twin) normalize() {
	if t.Desired == nil {
		t.Desired = map[string]any{}
	}
	if t.Reported == nil {
		t.Reported = map[string]any{}
	}
	t.DesiredVersion = max(t.DesiredVersion, 1)
	t.ReportedVersion = max(t.ReportedVersion, 1)
}

func withVersion(m map[string]any, v int64) map[string]any {
	out := make(map[string]any, len(m)+1)
	for k, x := range m {
		out[k] = x
	}
	out["$version"] = v
	return out
}

// document is the twin as a device GET returns it.
func (t *twin) document() map[string]any {
	return map[string]any{
		"desired":  withVersion(t.Desired, t.DesiredVersion),
		"reported": withVersion(t.Reported, t.ReportedVersion),
	}
}

// decodePatch parses a twin patch: a JSON object whose keys follow the
// twin rules (no '.', '$' or space, nesting at most ten levels).
func decodePatch(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("patch is not valid JSON: %v", err)
	}
	if dec.More() {
		return nil, errors.New("patch has data after the JSON object")
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, errors.New("patch must be a JSON object")
	}
	if err := checkKeys(m, 1); err != nil {
		return nil, err
	}
	return m, nil
}

func checkKeys(m map[string]any, depth int) error {
	if depth > maxTwinDepth {
		return fmt.Errorf("patch nests deeper than %d levels", maxTwinDepth)
	}
	for k, v := range m {
		if k == "" || strings.ContainsAny(k, ".$ ") || len(k) > 1024 {
			return fmt.Errorf("property name %q is not allowed (no '.', '$' or space, not empty)", k)
		}
		if sub, ok := v.(map[string]any); ok {
			if err := checkKeys(sub, depth+1); err != nil {
				return err
			}
		}
	}
	return nil
}

// mergePatch applies a JSON merge patch: null deletes, objects merge.
func mergePatch(dst, patch map[string]any) {
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(dst, k)
		case map[string]any:
			dm, ok := dst[k].(map[string]any)
			if !ok {
				dm = map[string]any{}
			}
			mergePatch(dm, pv)
			dst[k] = dm
		default:
			dst[k] = v
		}
	}
}

// deepCopy copies a decoded JSON value.
func deepCopy(v any) any {
	switch x := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[k] = deepCopy(e)
		}
		return m
	case []any:
		s := make([]any, len(x))
		for i, e := range x {
			s[i] = deepCopy(e)
		}
		return s
	default:
		return v
	}
}

// applyPatch merges patch into a copy of section and checks the size limit.
func applyPatch(section, patch map[string]any) (map[string]any, error) {
	next := deepCopy(section).(map[string]any)
	mergePatch(next, patch)
	b, err := json.Marshal(next)
	if err != nil {
		return nil, err
	}
	if len(b) > maxTwinSection {
		return nil, fmt.Errorf("section would be %d bytes, over the %d byte limit", len(b), maxTwinSection)
	}
	return next, nil
}

// hubError is the JSON body of an error answer on a $iothub topic.
func (h *Hub) errorBody(code int, msg string, retryAfter int) []byte {
	body := map[string]any{
		"errorCode":    code,
		"message":      msg,
		"trackingId":   newUUID(),
		"timestampUtc": h.now().UTC().Format("2006-01-02T15:04:05.000Z"),
	}
	if retryAfter > 0 {
		body["retryAfter"] = retryAfter
	}
	b, _ := json.Marshal(body)
	return b
}

// extendedCode maps an HTTP-like status to an IoT Hub error code.
func extendedCode(status int) int {
	switch status {
	case 429:
		return 429001
	case 500:
		return 500001
	case 503:
		return 503001
	}
	return status*1000 + 1
}

// twinReply sends a twin response if the device listens for them, late if
// a twin delay fault is armed.
func (h *Hub) twinReply(cl *mqtt.Client, status int, rid string, extra string, body []byte) {
	if ok, _ := subscribed(cl, subTwinRes); !ok {
		return
	}
	// Responses go out at QoS 0 like the hub's.
	topic := "$iothub/twin/res/" + strconv.Itoa(status) + "/?$rid=" + bagEscape(rid) + extra
	if h.cfg.Faults != nil {
		if d := h.cfg.Faults.TakeTwinDelay(); d > 0 {
			h.mu.Lock()
			h.goLocked(func() {
				t := time.NewTimer(d)
				defer t.Stop()
				select {
				case <-h.ctx.Done():
				case <-t.C:
					_ = h.send(cl, topic, body, 0)
				}
			})
			h.mu.Unlock()
			return
		}
	}
	_ = h.send(cl, topic, body, 0)
}

// twinFault answers with an injected error if one is armed.
func (h *Hub) twinFault(cl *mqtt.Client, rid string) bool {
	if ok, wait := h.twinOps.Allow("", h.now()); !ok {
		ra := broker.RetryAfterSeconds(wait)
		h.twinReply(cl, 429, rid, "&retry-after="+strconv.Itoa(ra), h.errorBody(429001, fmt.Sprintf("more than %d twin operations per second on this hub (throttled)", h.cfg.TwinRate), ra))
		return true
	}
	if h.cfg.Faults == nil {
		return false
	}
	a, ok := h.cfg.Faults.Take(faults.Hub)
	if !ok {
		return false
	}
	extra := ""
	if a.RetryAfter > 0 {
		// Emulator choice: the hub documents no retry hint for twin
		// requests; we add one the way DPS sends it.
		extra = "&retry-after=" + strconv.Itoa(a.RetryAfter)
	}
	h.twinReply(cl, a.Status, rid, extra, h.errorBody(extendedCode(a.Status), http.StatusText(a.Status)+" (fault injected by azsim)", a.RetryAfter))
	return true
}

func (h *Hub) twinGet(cl *mqtt.Client, t deviceTopic) {
	if !t.hasRID {
		return
	}
	if h.twinFault(cl, t.rid) {
		return
	}
	h.mu.Lock()
	d, ok := h.devices[cl.ID]
	var body []byte
	if ok {
		body, _ = json.Marshal(d.Twin.document())
	}
	h.mu.Unlock()
	if !ok {
		h.twinReply(cl, 404, t.rid, "", h.errorBody(404001, "device not found", 0))
		return
	}
	h.quota.charge(len(body)) // twin reads are metered by the twin's size
	h.twinReply(cl, 200, t.rid, "", body)
}

func (h *Hub) twinPatchReported(cl *mqtt.Client, t deviceTopic, payload []byte) {
	if !t.hasRID {
		return
	}
	if h.twinFault(cl, t.rid) {
		return
	}
	patch, err := decodePatch(payload)
	if err != nil {
		h.twinReply(cl, 400, t.rid, "", h.errorBody(400004, "reported properties "+err.Error(), 0))
		return
	}
	h.mu.Lock()
	d, ok := h.devices[cl.ID]
	if !ok {
		h.mu.Unlock()
		h.twinReply(cl, 404, t.rid, "", h.errorBody(404001, "device not found", 0))
		return
	}
	next, err := applyPatch(d.Twin.Reported, patch)
	if err != nil {
		h.mu.Unlock()
		h.twinReply(cl, 400, t.rid, "", h.errorBody(400004, "reported properties: "+err.Error(), 0))
		return
	}
	d.Twin.Reported = next
	d.Twin.ReportedVersion++
	v := d.Twin.ReportedVersion
	h.mu.Unlock()
	if err := h.persist(); err != nil {
		h.twinReply(cl, 500, t.rid, "", h.errorBody(500001, "azsim could not save the twin", 0))
		return
	}
	h.quota.charge(len(payload))
	h.twinReply(cl, 204, t.rid, "&$version="+strconv.FormatInt(v, 10), nil)
}

// patchDesired applies a desired-properties patch from the service side and
// notifies the device if it is connected and subscribed.
func (h *Hub) patchDesired(id string, body []byte) (int64, error) {
	patch, err := decodePatch(body)
	if err != nil {
		return 0, errorf(http.StatusBadRequest, "desired properties %v; send a JSON object such as {\"interval\":30}", err)
	}
	h.mu.Lock()
	d, ok := h.devices[id]
	if !ok {
		h.mu.Unlock()
		return 0, errNoDevice(id)
	}
	next, err := applyPatch(d.Twin.Desired, patch)
	if err != nil {
		h.mu.Unlock()
		return 0, errorf(http.StatusBadRequest, "desired properties: %v", err)
	}
	d.Twin.Desired = next
	d.Twin.DesiredVersion++
	v := d.Twin.DesiredVersion
	cl, _ := h.liveClientLocked(id)
	h.mu.Unlock()
	if err := h.persist(); err != nil {
		return 0, err
	}
	if cl != nil {
		if ok, _ := subscribed(cl, subDesired); ok {
			b, _ := json.Marshal(withVersion(patch, v))
			h.quota.charge(len(b))
			_ = h.send(cl, "$iothub/twin/PATCH/properties/desired/?$version="+strconv.FormatInt(v, 10), b, 0)
		}
	}
	return v, nil
}

func (h *Hub) twinDocument(id string) (map[string]any, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.devices[id]
	if !ok {
		return nil, errNoDevice(id)
	}
	return deepCopy(d.Twin.document()).(map[string]any), nil
}
