package dps

import (
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"sort"

	"github.com/gwagent/gwagent/azsim/broker"
)

func pemDecode(b []byte) ([]byte, []byte) {
	blk, rest := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, rest
	}
	return blk.Bytes, rest
}

// AdminHandler serves the DPS admin API under /dps/ (mount without
// stripping the prefix):
//
//	GET  /dps/enrollments                      list enrollment groups
//	PUT  /dps/enrollments/{id}                 {"kind":"x509","ca":PEM} or {"kind":"symmetricKey","primaryKey":B64}; "enabled" defaults to true
//	POST /dps/enrollments/{id}/enable|disable
//	GET  /dps/registrations                    assigned devices
//	GET  /dps/derive-key?registrationId=R&group=G  {"deviceKey":B64}
func (d *DPS) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	d.tpmAdmin(mux) // tpmenroll.go
	mux.HandleFunc("GET /dps/enrollments", func(w http.ResponseWriter, r *http.Request) {
		list := d.Enrollments()
		sort.Slice(list, func(i, j int) bool { return list[i].ID < list[j].ID })
		broker.WriteJSON(w, 200, list)
	})
	mux.HandleFunc("PUT /dps/enrollments/{id}", func(w http.ResponseWriter, r *http.Request) {
		var e struct {
			Enrollment
			Enabled *bool `json:"enabled"`
		}
		b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err := json.Unmarshal(b, &e); err != nil {
			broker.WriteJSON(w, 400, map[string]string{"error": "body is not JSON: " + err.Error()})
			return
		}
		e.Enrollment.ID = r.PathValue("id")
		e.Enrollment.Enabled = e.Enabled == nil || *e.Enabled
		if err := d.PutEnrollment(e.Enrollment); err != nil {
			broker.WriteJSON(w, 400, map[string]string{"error": err.Error()})
			return
		}
		broker.WriteJSON(w, 200, e.Enrollment)
	})
	for _, action := range []string{"enable", "disable"} {
		mux.HandleFunc("POST /dps/enrollments/{id}/"+action, func(w http.ResponseWriter, r *http.Request) {
			if err := d.SetEnabled(r.PathValue("id"), action == "enable"); err != nil {
				broker.WriteJSON(w, 404, map[string]string{"error": err.Error()})
				return
			}
			w.WriteHeader(http.StatusNoContent)
		})
	}
	mux.HandleFunc("GET /dps/registrations", func(w http.ResponseWriter, r *http.Request) {
		list := d.Registrations()
		sort.Slice(list, func(i, j int) bool { return list[i].RegistrationID < list[j].RegistrationID })
		broker.WriteJSON(w, 200, list)
	})
	mux.HandleFunc("GET /dps/derive-key", func(w http.ResponseWriter, r *http.Request) {
		reg, group := r.URL.Query().Get("registrationId"), r.URL.Query().Get("group")
		for _, e := range d.Enrollments() {
			if e.ID == group && e.Kind == KindSymmetricKey && reg != "" {
				k, err := DeriveKey(e.PrimaryKey, reg)
				if err == nil {
					broker.WriteJSON(w, 200, map[string]string{"deviceKey": k})
					return
				}
			}
		}
		broker.WriteJSON(w, 404, map[string]string{"error": "need registrationId and the id of a symmetricKey enrollment group"})
	})
	return mux
}
