package hub

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/azsim/broker"
)

const (
	maxAdminBody         = 1 << 20
	defaultMethodTimeout = 30 * time.Second
)

// adminMux routes the admin API:
//
//	GET    /hub/devices                         list devices
//	GET    /hub/devices/{id}                    one device
//	PUT    /hub/devices/{id}                    create/update {"auth":..., "primaryKey"|"thumbprints", "enabled"?}
//	DELETE /hub/devices/{id}                    delete
//	POST   /hub/devices/{id}/enable|disable     204 (disable drops the connection)
//	GET    /hub/devices/{id}/twin               {"desired":{...,"$version"},"reported":{...,"$version"}}
//	PATCH  /hub/devices/{id}/twin/desired       JSON patch -> {"$version":n}
//	POST   /hub/devices/{id}/methods/{name}?timeout=SECONDS  payload -> {"status","payload"}
//	POST   /hub/devices/{id}/c2d?prop=k=v...    message -> 202 {"messageId","state"}
//	GET    /hub/cas                             registered CAs
//	POST   /hub/cas/{name}                      PEM CA -> {"name","verificationCode","verified":false,...}
//	POST   /hub/cas/{name}/verify               PEM proof (CN = code, signed by the CA) -> {"verified":true,...}
//	DELETE /hub/cas/{name}
//	GET    /hub/quota                           tier, throttles, the day's quota use and clock
//	PUT    /hub/quota                           {"used":N} -> the quota view (set today's use)
//	POST   /hub/quota/clock                     {"set":"RFC 3339 time"} | {"advance":"90m"} | {"reset":true} -> the quota view
//
// Errors are {"error":"what is wrong and what to do"} with a fitting status.
func (h *Hub) adminMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hub/devices", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, h.deviceViews())
	})
	mux.HandleFunc("GET /hub/devices/{id}", func(w http.ResponseWriter, r *http.Request) {
		v, err := h.deviceView(r.PathValue("id"))
		reply(w, http.StatusOK, v, err)
	})
	mux.HandleFunc("PUT /hub/devices/{id}", func(w http.ResponseWriter, r *http.Request) {
		var spec deviceSpec
		if err := decodeJSONBody(r, &spec); err != nil {
			writeError(w, err)
			return
		}
		v, created, err := h.putDevice(r.PathValue("id"), spec)
		status := http.StatusOK
		if created {
			status = http.StatusCreated
		}
		reply(w, status, v, err)
	})
	mux.HandleFunc("DELETE /hub/devices/{id}", func(w http.ResponseWriter, r *http.Request) {
		replyNoContent(w, h.deleteDevice(r.PathValue("id")))
	})
	mux.HandleFunc("POST /hub/devices/{id}/enable", func(w http.ResponseWriter, r *http.Request) {
		replyNoContent(w, h.setEnabled(r.PathValue("id"), true))
	})
	mux.HandleFunc("POST /hub/devices/{id}/disable", func(w http.ResponseWriter, r *http.Request) {
		replyNoContent(w, h.setEnabled(r.PathValue("id"), false))
	})
	mux.HandleFunc("GET /hub/devices/{id}/twin", func(w http.ResponseWriter, r *http.Request) {
		doc, err := h.twinDocument(r.PathValue("id"))
		reply(w, http.StatusOK, doc, err)
	})
	mux.HandleFunc("PATCH /hub/devices/{id}/twin/desired", func(w http.ResponseWriter, r *http.Request) {
		body, err := readBody(r)
		if err != nil {
			writeError(w, err)
			return
		}
		v, err := h.patchDesired(r.PathValue("id"), body)
		reply(w, http.StatusOK, map[string]int64{"$version": v}, err)
	})
	mux.HandleFunc("POST /hub/devices/{id}/methods/{name}", func(w http.ResponseWriter, r *http.Request) {
		timeout := defaultMethodTimeout
		if s := r.URL.Query().Get("timeout"); s != "" {
			f, err := strconv.ParseFloat(s, 64)
			if err != nil {
				writeError(w, errorf(http.StatusBadRequest, "timeout %q is not a number of seconds", s))
				return
			}
			timeout = time.Duration(f * float64(time.Second))
		}
		body, err := readBody(r)
		if err != nil {
			writeError(w, err)
			return
		}
		res, err := h.invokeMethod(r.Context(), r.PathValue("id"), r.PathValue("name"), body, timeout)
		reply(w, http.StatusOK, res, err)
	})
	mux.HandleFunc("POST /hub/devices/{id}/c2d", func(w http.ResponseWriter, r *http.Request) {
		var props []property
		for _, p := range r.URL.Query()["prop"] {
			k, v, hasV := strings.Cut(p, "=")
			if k == "" {
				writeError(w, errorf(http.StatusBadRequest, "prop %q must be key=value (or key for a null value)", p))
				return
			}
			prop := property{key: k}
			if hasV {
				prop.value = &v
			}
			props = append(props, prop)
		}
		body, err := readBody(r)
		if err != nil {
			writeError(w, err)
			return
		}
		res, err := h.sendC2D(r.PathValue("id"), body, props)
		reply(w, http.StatusAccepted, res, err)
	})
	mux.HandleFunc("GET /hub/cas", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, h.listCAs())
	})
	mux.HandleFunc("POST /hub/cas/{name}", func(w http.ResponseWriter, r *http.Request) {
		body, err := readBody(r)
		if err != nil {
			writeError(w, err)
			return
		}
		v, err := h.uploadCA(r.PathValue("name"), body)
		reply(w, http.StatusCreated, v, err)
	})
	mux.HandleFunc("POST /hub/cas/{name}/verify", func(w http.ResponseWriter, r *http.Request) {
		body, err := readBody(r)
		if err != nil {
			writeError(w, err)
			return
		}
		v, err := h.verifyCA(r.PathValue("name"), body)
		reply(w, http.StatusOK, v, err)
	})
	mux.HandleFunc("DELETE /hub/cas/{name}", func(w http.ResponseWriter, r *http.Request) {
		replyNoContent(w, h.deleteCA(r.PathValue("name")))
	})
	mux.HandleFunc("GET /hub/quota", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, h.Limits())
	})
	mux.HandleFunc("PUT /hub/quota", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Used *int64 `json:"used"`
		}
		if err := decodeJSONBody(r, &req); err != nil {
			writeError(w, err)
			return
		}
		if req.Used == nil || *req.Used < 0 {
			writeError(w, errorf(http.StatusBadRequest, `need {"used":N} with N >= 0 (messages of today's quota already used)`))
			return
		}
		if err := h.quotaOn(); err != nil {
			writeError(w, err)
			return
		}
		h.quota.setUsed(*req.Used)
		writeJSON(w, http.StatusOK, h.Limits())
	})
	mux.HandleFunc("POST /hub/quota/clock", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Set     string `json:"set"`
			Advance string `json:"advance"`
			Reset   bool   `json:"reset"`
		}
		if err := decodeJSONBody(r, &req); err != nil {
			writeError(w, err)
			return
		}
		if err := h.quotaOn(); err != nil {
			writeError(w, err)
			return
		}
		switch {
		case req.Set != "" && req.Advance == "" && !req.Reset:
			t, err := time.Parse(time.RFC3339Nano, req.Set)
			if err != nil {
				writeError(w, errorf(http.StatusBadRequest, "set %q is not an RFC 3339 time such as 2025-01-01T23:59:30Z", req.Set))
				return
			}
			h.quota.setClock(t)
		case req.Advance != "" && req.Set == "" && !req.Reset:
			d, err := time.ParseDuration(req.Advance)
			if err != nil {
				writeError(w, errorf(http.StatusBadRequest, "advance %q is not a duration such as 90m or 24h", req.Advance))
				return
			}
			h.quota.advanceClock(d)
		case req.Reset && req.Set == "" && req.Advance == "":
			h.quota.setClock(h.now())
		default:
			writeError(w, errorf(http.StatusBadRequest, `need exactly one of {"set":"2025-01-01T23:59:30Z"}, {"advance":"90m"}, {"reset":true}`))
			return
		}
		_ = h.quota.save()
		writeJSON(w, http.StatusOK, h.Limits())
	})
	mux.HandleFunc("/hub/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errorf(http.StatusNotFound, "no hub admin route %s %s; see `azsim --help` for the admin API", r.Method, r.URL.Path))
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Tolerate being mounted behind http.StripPrefix("/hub", ...).
		if !strings.HasPrefix(r.URL.Path, "/hub/") && r.URL.Path != "/hub" {
			r2 := r.Clone(r.Context())
			r2.URL.Path = "/hub" + r.URL.Path
			r2.URL.RawPath = ""
			r = r2
		}
		mux.ServeHTTP(w, r)
	})
}

func readBody(r *http.Request) ([]byte, error) {
	b, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxAdminBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errorf(http.StatusRequestEntityTooLarge, "request body is over %d bytes", maxAdminBody)
		}
		return nil, errorf(http.StatusBadRequest, "read request body: %v", err)
	}
	return b, nil
}

func decodeJSONBody(r *http.Request, v any) error {
	b, err := readBody(r)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return errorf(http.StatusBadRequest, "request body is not the expected JSON: %v", err)
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) { broker.WriteJSON(w, status, v) }

func writeError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	var he *httpError
	if errors.As(err, &he) {
		status = he.status
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

func reply(w http.ResponseWriter, status int, v any, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, status, v)
}

func replyNoContent(w http.ResponseWriter, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// LimitsView is the hub's tier, throttles and daily quota (GET /hub/quota).
type LimitsView struct {
	Tier  string `json:"tier,omitempty"`
	Units int    `json:"units,omitempty"`
	// Rates per second, hub-wide; 0: not throttled.
	ConnectRate int `json:"connectRate"`
	TwinRate    int `json:"twinRate"`
	D2CRate     int `json:"d2cRate"`
	// D2CBurst messages above the rate are taken at once; after that a
	// message is held up to D2CBacklog before the connection is closed.
	D2CBurst   int       `json:"d2cBurst,omitempty"`
	D2CBacklog string    `json:"d2cBacklog,omitempty"`
	Quota      QuotaView `json:"quota"`
}

// Limits is the hub's tier, throttles and quota use, as GET /hub/quota
// shows them.
func (h *Hub) Limits() LimitsView {
	v := LimitsView{Tier: h.cfg.Tier.Name, Units: h.cfg.Tier.Units, ConnectRate: h.cfg.ConnectRate, TwinRate: h.cfg.TwinRate,
		D2CRate: h.cfg.D2CRate, Quota: h.quota.view()}
	if h.shaper != nil {
		v.D2CBurst, v.D2CBacklog = h.cfg.D2CBurst, h.cfg.D2CBacklog.String()
	}
	return v
}

func (h *Hub) quotaOn() error {
	if h.quota == nil {
		return errorf(http.StatusConflict, "this hub has no daily quota: start azsim with a hub tier (--hub-tier, the default S1) and without --gentle")
	}
	return nil
}
