{{/*
The webhook's name: its Service, its --name and both webhook configurations. One helper,
so that the webhook's Service and Deployment (--name) templates, still to come, and the
configurations here agree. The binary's --name default is this helper's default for the
Harvester add-on release (harvester-vm-dhcp-controller-webhook).
*/}}
{{- define "vm-dhcp.webhookName" -}}
{{- $name := .Values.webhook.service.name | default (printf "%s-webhook" .Release.Name) -}}
{{- if gt (len $name) 63 -}}
{{- fail (printf "webhook Service name %q is longer than 63 characters: set webhook.service.name" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/*
The cert-manager Certificate whose CA cainjector copies into the configurations.
*/}}
{{- define "vm-dhcp.webhookCertificate" -}}
{{- .Values.webhook.tls.certManager.certificate | default (include "vm-dhcp.webhookName" .) -}}
{{- end -}}
