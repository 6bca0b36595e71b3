{{/*
Names. The fullname follows the Go chart's rule (nameOverride, fullnameOverride, and the
release name alone when it already contains the chart name), so that for the Harvester
add-on release "harvester-vm-dhcp-controller" every object keeps the Go chart's name.
*/}}
{{- define "vm-dhcp.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vm-dhcp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "vm-dhcp.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"<fullname>-<suffix>", refused when longer than a Service name may be.
Call with (list . "suffix").
*/}}
{{- define "vm-dhcp.componentName" -}}
{{- $root := index . 0 -}}
{{- $name := printf "%s-%s" (include "vm-dhcp.fullname" $root) (index . 1) -}}
{{- if gt (len $name) 63 -}}
{{- fail (printf "%q is longer than 63 characters: set a shorter fullnameOverride" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/*
The webhook's name: its Service, its --name and both webhook configurations.
*/}}
{{- define "vm-dhcp.webhookName" -}}
{{- $name := .Values.webhook.service.name | default (printf "%s-webhook" (include "vm-dhcp.fullname" .)) -}}
{{- if gt (len $name) 63 -}}
{{- fail (printf "webhook Service name %q is longer than 63 characters: set webhook.service.name" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/*
The aggregated API server's Service (and Deployment) name.
*/}}
{{- define "vm-dhcp.apiserverName" -}}
{{- include "vm-dhcp.componentName" (list . "apiserver") -}}
{{- end -}}

{{/*
The certificate mode: certificates.mode, or its older name webhook.tls.mode when set.
Refuses unknown modes, contradicting settings, and cert-manager mode on a cluster without
cert-manager.
*/}}
{{- define "vm-dhcp.certificatesMode" -}}
{{- $mode := .Values.certificates.mode | default "self-managed" -}}
{{- $key := "certificates.mode" -}}
{{- with .Values.webhook.tls.mode -}}
{{- if and (ne $mode "self-managed") (ne $mode .) -}}
{{- fail (printf "certificates.mode is %q but webhook.tls.mode (its older name) is %q: set only certificates.mode" $mode .) -}}
{{- end -}}
{{- $mode = . -}}
{{- $key = "webhook.tls.mode" -}}
{{- end -}}
{{- if not (has $mode (list "self-managed" "cert-manager")) -}}
{{- fail (printf "%s must be self-managed or cert-manager, not %q" $key $mode) -}}
{{- end -}}
{{- if and (eq $mode "cert-manager") (not (.Capabilities.APIVersions.Has "cert-manager.io/v1")) -}}
{{- fail (printf "%s is cert-manager, but this cluster does not serve cert-manager.io/v1: install cert-manager first, or use %s=self-managed" $key $key) -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{/*
The cert-manager Certificate of the webhook (cainjector copies its CA into the
configurations).
*/}}
{{- define "vm-dhcp.webhookCertificate" -}}
{{- .Values.webhook.tls.certManager.certificate | default (include "vm-dhcp.webhookName" .) -}}
{{- end -}}

{{- define "vm-dhcp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels of a component. Deployment selectors cannot change, so the controller's
and the webhook's are the Go chart's (a `helm upgrade` from the Go add-on keeps its
Deployments): app.kubernetes.io/name is "<name>" for the controller and "<name>-<component>"
for the others. Call with (list . "controller"|"webhook"|"apiserver").
*/}}
{{- define "vm-dhcp.selectorLabels" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $suffix := ternary "" (printf "-%s" $component) (eq $component "controller") -}}
app.kubernetes.io/name: {{ include "vm-dhcp.name" $root }}{{ $suffix }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- end -}}

{{/*
Common labels of a component. Call with (list . "controller"|"webhook"|...).
*/}}
{{- define "vm-dhcp.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "vm-dhcp.chart" $root }}
{{ include "vm-dhcp.selectorLabels" . }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/part-of: vm-dhcp
{{- with $root.Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- end -}}

{{/*
ServiceAccount names: "<base>" for the controller (as the Go chart), "<base>-<component>"
for the others. Call with (list . "controller"|"agent"|"webhook"|"apiserver").
*/}}
{{- define "vm-dhcp.serviceAccountName" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $base := $root.Values.serviceAccount.name | default (include "vm-dhcp.fullname" $root) -}}
{{- if eq $component "controller" -}}
{{- $base -}}
{{- else -}}
{{- printf "%s-%s" $base $component -}}
{{- end -}}
{{- end -}}

{{/*
The image of a component: the one image, field by field overridden by the component's
own image key (agent.image, webhook.image, apiserver.image) where that is set.
Call with (list . "agent"|"webhook"|"apiserver"|"controller"); returns "repo:tag".
*/}}
{{- define "vm-dhcp.image" -}}
{{- $root := index . 0 -}}
{{- $own := dict -}}
{{- with (index $root.Values (index . 1)) -}}
{{- $own = .image | default dict -}}
{{- end -}}
{{- $repository := $own.repository | default $root.Values.image.repository -}}
{{- $tag := $own.tag | default $root.Values.image.tag | default $root.Chart.AppVersion -}}
{{- printf "%s:%s" $repository (toString $tag) -}}
{{- end -}}

{{- define "vm-dhcp.imagePullPolicy" -}}
{{- $root := index . 0 -}}
{{- $own := dict -}}
{{- with (index $root.Values (index . 1)) -}}
{{- $own = .image | default dict -}}
{{- end -}}
{{- $own.pullPolicy | default $root.Values.image.pullPolicy | default "IfNotPresent" -}}
{{- end -}}

{{/*
What every pod of the chart's Deployments shares: pull secrets, security context,
scheduling. Call with the root context.
*/}}
{{- define "vm-dhcp.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
automountServiceAccountToken: true
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Pod template metadata of a component. Call with (list . "component").
*/}}
{{- define "vm-dhcp.podMetadata" -}}
{{- $root := index . 0 -}}
{{- with $root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
labels:
  {{- include "vm-dhcp.labels" . | nindent 2 }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}
